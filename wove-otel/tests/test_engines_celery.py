"""One trace across the caller and a real ``celery worker`` (a prefork pool process), whose
``worker_process_init`` signal handler configures the SDK in each pool process (the way
docs/observability.md tells Celery users to trace workers). Broker and results on Redis
(this module's database, keys under a prefix of its own)."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from wove.environment import ExecutorRuntime

from ._engine_traces import WorkerProcess, check_one_trace, flush_redis, redis_url
from .conftest import Telemetry

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

APP = """\
from celery.signals import worker_process_init
from wove_executor_celery.worker import app
from wove_otel.testing import configure

app.conf.update({settings!r})


@worker_process_init.connect
def trace_this_process(**kwargs):
    configure({spans!r}, "celery-worker")  # the SDK with span files, then wove_otel.instrument()
"""


@pytest.fixture(scope="module")
def celery_worker(redis_service: tuple[str, int], tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[tuple[dict[str, Any], Path]]:
    """``(executor_config, spans dir)`` of a prefork ``celery worker`` (one pool process) on a queue of its own."""
    pytest.importorskip("wove_executor_celery")
    url = redis_url(*redis_service)
    folder = tmp_path_factory.mktemp("celery-otel")
    spans, name = folder / "spans", uuid.uuid4().hex[:8]
    prefix = f"wove-otel-{name}:"
    settings = {"broker_url": url, "result_backend": url,
                "broker_transport_options": {"global_keyprefix": prefix},
                "result_backend_transport_options": {"global_keyprefix": prefix}}
    module = f"celery_otel_app_{name}"
    (folder / f"{module}.py").write_text(APP.format(settings=settings, spans=str(spans)))
    queue = f"wove-otel-{name}"
    worker = WorkerProcess(
        [sys.executable, "-m", "celery", "-A", module, "worker", "-Q", queue, "-P", "prefork", "-c", "1",
         "-n", f"wove-otel-{name}@127.0.0.1", "--without-gossip", "--without-mingle", "-l", "INFO"],
        folder / "worker.log", lambda process: " ready." in process.output(), cwd=folder, what="celery worker",
        env={"PYTHONPATH": str(folder)}).start(timeout=60)
    config = {"broker_url": url, "result_backend": url, "queue": queue,
              "app_config": {key: value for key, value in settings.items() if key.endswith("_options")}}
    try:
        yield config, spans
    finally:
        worker.stop()
        flush_redis(url)


async def test_caller_and_celery_worker_spans_share_one_trace(celery_worker: tuple[dict[str, Any], Path],
                                                              otel: Telemetry) -> None:
    config, spans = celery_worker
    async with ExecutorRuntime({"tasks": {"executor": "celery", "executor_config": config}}) as runtime:
        await check_one_trace(runtime, "tasks", "celery", spans, otel)
