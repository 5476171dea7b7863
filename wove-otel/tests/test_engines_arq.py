"""One trace across the caller and a real ``arq`` worker, whose settings' ``on_startup``
hook configures the SDK (the way docs/observability.md tells arq users to trace workers)."""

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

SETTINGS = """\
from arq.connections import RedisSettings
from wove_executor_arq.worker import worker_settings
from wove_otel.testing import configure


async def startup(ctx):
    configure({spans!r}, "arq-worker")  # the SDK with span files, then wove_otel.instrument()


WorkerSettings = worker_settings(redis_settings=RedisSettings.from_dsn({url!r}), queue_name={queue!r},
                                 poll_delay=0.02, on_startup=startup)
"""


@pytest.fixture(scope="module")
def arq_worker(redis_service: tuple[str, int], tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[tuple[str, str, Path]]:
    """``(redis url, queue, spans dir)`` of an arq worker on a queue of its own."""
    pytest.importorskip("wove_executor_arq")
    from redis import Redis

    url = redis_url(*redis_service)
    folder = tmp_path_factory.mktemp("arq-otel")
    spans, queue = folder / "spans", f"wove-otel-{uuid.uuid4().hex[:8]}"
    module = f"arq_otel_settings_{uuid.uuid4().hex[:8]}"
    (folder / f"{module}.py").write_text(SETTINGS.format(spans=str(spans), url=url, queue=queue))
    connection = Redis.from_url(url)
    health = f"{queue}:health-check"  # arq writes it once it polls

    worker = WorkerProcess([sys.executable, "-m", "arq", f"{module}.WorkerSettings"], folder / "worker.log",
                           lambda _: bool(connection.exists(health)), cwd=folder, what="arq worker").start()
    try:
        yield url, queue, spans
    finally:
        worker.stop()
        connection.close()
        flush_redis(url)


async def test_caller_and_arq_worker_spans_share_one_trace(arq_worker: tuple[str, str, Path], otel: Telemetry) -> None:
    url, queue, spans = arq_worker
    config = {"redis_settings": url, "queue_name": queue}
    async with ExecutorRuntime({"jobs": {"executor": "arq", "executor_config": config}}) as runtime:
        await check_one_trace(runtime, "jobs", "arq", spans, otel)
