"""One trace across the caller and Dask worker processes (the backend payload carries the
trace context; the workers write their spans to files, configured with client.run)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from wove.environment import ExecutorRuntime
from wove_otel import names
from wove_otel.testing import configure, read_logs, read_spans

from .conftest import Telemetry

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def traced_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A LocalCluster with one worker process, its spans written under a directory."""
    pytest.importorskip("distributed")
    from distributed import Client, LocalCluster

    spans = tmp_path_factory.mktemp("dask-spans")
    cluster = LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None)
    try:
        with Client(cluster) as client:
            client.run(configure, str(spans), "dask-worker")  # every worker process: SDK + instrument()
        yield cluster.scheduler_address, spans
    finally:
        cluster.close(timeout=20)


@pytest.mark.timeout(120)
async def test_caller_and_dask_worker_spans_share_one_trace(traced_cluster: tuple[str, Path],
                                                            otel: Telemetry) -> None:
    address, spans_dir = traced_cluster

    def traced_task(value: int) -> dict[str, Any]:  # defined here: travels by value to the workers
        import logging

        from opentelemetry import trace as task_trace

        with task_trace.get_tracer("task-code").start_as_current_span("inner work") as span:
            logging.getLogger("traced_task").info("inside traced_task %d", value)
            context = span.get_span_context()
            return {"trace_id": format(context.trace_id, "032x"), "span_id": format(context.span_id, "016x"),
                    "value": value * 2}

    definition: dict[str, Any] = {"executor": "dask", "executor_config": {"address": address}}
    async with ExecutorRuntime({"cluster": definition}) as runtime:
        with trace.get_tracer("test").start_as_current_span("request") as request_span:
            result = await runtime.call("cluster", traced_task, 5)
    trace_id = format(request_span.get_span_context().trace_id, "032x")
    assert result["trace_id"] == trace_id and result["value"] == 10
    (producer,) = otel.finished("send cluster")
    assert producer.kind is SpanKind.PRODUCER
    attributes = dict(producer.attributes or {})
    assert attributes[names.MESSAGING_SYSTEM] == "dask"
    assert attributes[names.MESSAGING_DESTINATION_NAME] == "cluster"
    assert attributes[names.MESSAGING_OPERATION_TYPE] == "send"
    assert attributes[names.MESSAGING_MESSAGE_ID] == attributes[names.WOVE_RUN_ID]
    assert attributes[names.WOVE_OUTCOME] == "ok"
    worker_spans = read_spans(spans_dir)
    (consumer,) = [s for s in worker_spans if s["name"] == "process traced_task"]
    assert consumer["kind"] == "CONSUMER" and consumer["pid"] != os.getpid()
    assert consumer["trace_id"] == trace_id
    assert consumer["parent_span_id"] == format(producer.context.span_id, "016x")
    assert consumer["attributes"][names.WOVE_WORKER] == "backend:dask"
    assert consumer["attributes"][names.MESSAGING_SYSTEM] == "dask"
    (inner,) = [s for s in worker_spans if s["span_id"] == result["span_id"]]
    assert inner["parent_span_id"] == consumer["span_id"]
    records = [r for r in read_logs(spans_dir) if r["message"] == "inside traced_task 5"]
    assert [(r["otelTraceID"], r["otelSpanID"]) for r in records] == [(trace_id, result["span_id"])]
