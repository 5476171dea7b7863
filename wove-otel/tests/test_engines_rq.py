"""One trace across the caller and a real ``rq worker`` (a work horse forked per job).

The worker is traced the way docs/observability.md tells RQ users to: a worker-class module
that configures the SDK when ``rq worker --worker-class`` imports it (before any fork), with
a *batch* span processor; ``wove_executor_rq.worker.Worker`` flushes it in the work horse,
which RQ ends with ``os._exit`` (no exit handlers: unflushed spans would be lost).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from wove.environment import ExecutorRuntime

from ._engine_traces import WorkerProcess, check_one_trace, flush_redis, redis_url
from .conftest import Telemetry

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

WORKER_MODULE = """\
import logging

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

import wove_otel
import wove_executor_rq.worker
from wove_otel.testing import JsonLogHandler, SpanFileExporter

provider = TracerProvider(resource=Resource.create({{"service.name": "rq-worker"}}))
provider.add_span_processor(BatchSpanProcessor(SpanFileExporter({spans!r})))
trace.set_tracer_provider(provider)
wove_otel.instrument()
logging.getLogger().addHandler(JsonLogHandler({spans!r}))

Worker = wove_executor_rq.worker.Worker  # it flushes the work horse's spans after each job
"""


@pytest.fixture(scope="module")
def rq_worker(redis_service: tuple[str, int], tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[tuple[str, str, Path]]:
    """``(redis url, queue, spans dir)`` of a traced ``rq worker`` on a queue of its own."""
    pytest.importorskip("wove_executor_rq")
    import sys

    from redis import Redis

    url = redis_url(*redis_service)
    folder = tmp_path_factory.mktemp("rq-otel")
    spans, queue, name = folder / "spans", f"wove-otel-{uuid.uuid4().hex[:8]}", f"wove-otel-{uuid.uuid4().hex[:8]}"
    module = f"rq_otel_worker_{uuid.uuid4().hex[:8]}"
    (folder / f"{module}.py").write_text(WORKER_MODULE.format(spans=str(spans)))
    connection = Redis.from_url(url)
    channel = f"rq:pubsub:{name}"

    def subscribed(_: WorkerProcess) -> bool:  # the worker listens for commands once it is up
        return bool(dict(connection.pubsub_numsub(channel)).get(channel.encode(), 0))

    worker = WorkerProcess(
        [sys.executable, "-m", "rq.cli", "worker", "--url", url, "--worker-class", f"{module}.Worker",
         "--name", name, "--logging_level", "WARNING", queue],
        folder / "worker.log", subscribed, cwd=folder, env={"PYTHONPATH": str(folder)}, what="rq worker").start()
    try:
        yield url, queue, spans
    finally:
        worker.stop()
        connection.close()
        flush_redis(url)


async def test_caller_and_rq_worker_spans_share_one_trace(rq_worker: tuple[str, str, Path], otel: Telemetry) -> None:
    url, queue, spans = rq_worker
    config = {"redis_url": url, "queue_name": queue}
    async with ExecutorRuntime({"jobs": {"executor": "rq", "executor_config": config}}) as runtime:
        await check_one_trace(runtime, "jobs", "rq", spans, otel)
