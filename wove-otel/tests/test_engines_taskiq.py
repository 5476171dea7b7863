"""One trace across the caller and a real ``taskiq worker`` (its worker child process), whose
broker's ``WORKER_STARTUP`` event handler configures the SDK (the way docs/observability.md
tells taskiq users to trace workers)."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from wove.environment import ExecutorRuntime

from ._engine_traces import WorkerProcess, check_one_trace, flush_redis, redis_url
from .conftest import Telemetry

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

TASKS = """\
from taskiq import TaskiqEvents
from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend
from wove_executor_taskiq.worker import register
from wove_otel.testing import configure

broker = ListQueueBroker({url!r}, queue_name={queue!r}).with_result_backend(RedisAsyncResultBackend({url!r}))
register(broker)


@broker.on_event(TaskiqEvents.WORKER_STARTUP)
async def startup(state):
    configure({spans!r}, "taskiq-worker")  # the SDK with span files, then wove_otel.instrument()
"""


@pytest.fixture(scope="module")
def taskiq_worker(redis_service: tuple[str, int], tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[tuple[str, str, Path]]:
    """``(redis url, queue, spans dir)`` of a ``taskiq worker`` (one child) on a queue of its own."""
    pytest.importorskip("wove_executor_taskiq")
    url = redis_url(*redis_service)
    folder = tmp_path_factory.mktemp("taskiq-otel")
    spans, queue = folder / "spans", f"wove-otel-{uuid.uuid4().hex[:8]}"
    module = f"taskiq_otel_tasks_{uuid.uuid4().hex[:8]}"
    (folder / f"{module}.py").write_text(TASKS.format(spans=str(spans), url=url, queue=queue))
    worker = WorkerProcess([sys.executable, "-m", "taskiq", "worker", f"{module}:broker", "--workers", "1"],
                           folder / "worker.log", lambda process: "Listening started" in process.output(),
                           cwd=folder, what="taskiq worker").start()
    try:
        yield url, queue, spans
    finally:
        worker.stop()
        flush_redis(url)


async def test_caller_and_taskiq_worker_spans_share_one_trace(taskiq_worker: tuple[str, str, Path],
                                                              otel: Telemetry) -> None:
    from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend

    from wove_executor_taskiq.worker import register

    url, queue, spans = taskiq_worker
    # the caller's own broker on the same queue (the worker's module, with its start-up hook, stays there)
    broker = ListQueueBroker(url, queue_name=queue).with_result_backend(RedisAsyncResultBackend(url))
    register(broker)
    await broker.startup()
    try:
        async with ExecutorRuntime({"jobs": {"executor": "taskiq", "executor_config": {"broker": broker}}}) as runtime:
            await check_one_trace(runtime, "jobs", "taskiq", spans, otel)
    finally:
        await broker.shutdown()
