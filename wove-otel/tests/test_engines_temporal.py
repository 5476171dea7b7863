"""One trace across the caller and a real Wove Temporal worker (``python -m
wove_executor_temporal.worker`` under the traced launcher) on a Temporal dev server, which
wove-executor-temporal's test fixture starts (``temporal server start-dev`` on 127.0.0.1)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from wove.environment import ExecutorRuntime

from ._engine_traces import WorkerProcess, check_one_trace, engine_conftest, traced
from .conftest import Telemetry

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

pytest.importorskip("wove_executor_temporal")
#: ``temporal_server`` (module scope): the dev server's ``host:port``, or the skip (CI: the failure) saying how to get it
temporal_server = engine_conftest("wove-executor-temporal").temporal_server


@pytest.fixture(scope="module")
def temporal_worker(temporal_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """``(task queue, spans dir)`` of a traced Wove Temporal worker on a task queue of its own."""
    folder = tmp_path_factory.mktemp("temporal-otel")
    spans, queue = folder / "spans", f"wove-otel-{uuid.uuid4().hex[:8]}"
    worker = WorkerProcess(
        traced(spans, "temporal-worker", "wove_executor_temporal.worker", "--target-host", temporal_server,
               "--task-queue", queue, "--grace", "2"),
        folder / "worker.log", lambda process: "listening on task queue" in process.output(), what="Temporal worker",
    ).start()
    try:
        yield queue, spans
    finally:
        worker.stop()


async def test_caller_and_temporal_worker_spans_share_one_trace(temporal_server: str,
                                                                temporal_worker: tuple[str, Path],
                                                                otel: Telemetry) -> None:
    queue, spans = temporal_worker
    config = {"target_host": temporal_server, "task_queue": queue}
    async with ExecutorRuntime({"flows": {"executor": "temporal", "executor_config": config}}) as runtime:
        await check_one_trace(runtime, "flows", "temporal", spans, otel)
