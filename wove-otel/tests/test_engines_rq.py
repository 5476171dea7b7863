"""One trace across the caller and a real ``rq worker`` (a work horse forked per job), the
worker started under the traced launcher (``python -m wove_otel.testing ... -m rq.cli worker``)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from wove.environment import ExecutorRuntime

from ._engine_traces import WorkerProcess, check_one_trace, flush_redis, redis_url, traced
from .conftest import Telemetry

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture(scope="module")
def rq_worker(redis_service: tuple[str, int], tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[tuple[str, str, Path]]:
    """``(redis url, queue, spans dir)`` of a traced ``rq worker`` on a queue of its own."""
    pytest.importorskip("wove_executor_rq")
    from redis import Redis

    url = redis_url(*redis_service)
    folder = tmp_path_factory.mktemp("rq-otel")
    spans, queue, name = folder / "spans", f"wove-otel-{uuid.uuid4().hex[:8]}", f"wove-otel-{uuid.uuid4().hex[:8]}"
    connection = Redis.from_url(url)
    channel = f"rq:pubsub:{name}"

    def subscribed(_: WorkerProcess) -> bool:  # the worker listens for commands once it is up
        return bool(dict(connection.pubsub_numsub(channel)).get(channel.encode(), 0))

    worker = WorkerProcess(
        traced(spans, "rq-worker", "rq.cli", "worker", "--url", url, "--worker-class",
               "wove_executor_rq.worker.Worker", "--name", name, "--logging_level", "WARNING", queue),
        folder / "worker.log", subscribed, cwd=folder, what="rq worker").start()
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
