"""What RQ workers run: the job function, and worker classes that preload it.

Start workers with one of the worker classes, so that every forked work horse finds
Wove's payload runner already imported (otherwise each job imports it afresh)::

    rq worker --url redis://127.0.0.1:6379/0 --worker-class wove_executor_rq.worker.Worker default

``wove_executor_rq.worker.SimpleWorker`` runs jobs in the worker process itself (no fork
per job: several times faster for short tasks, but a task that crashes the interpreter
takes the worker with it). A plain ``rq worker`` runs the jobs too, only slower. Wove 2.x
clients enqueue ``wove.integrations.worker.run``, which wove-backend provides; it runs on
these workers unchanged.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import encodings.idna  # noqa: F401 - http.client encodes callback host names with it
import os
import sys
import threading
from typing import Any

import cloudpickle  # noqa: F401 - payloads are cloudpickled: import it once, before any fork
from rq.worker import SimpleWorker as _RQSimpleWorker
from rq.worker import Worker as _RQWorker

from wove.backend import run_engine_payload, run_engine_payload_sync

__all__ = ["SimpleWorker", "Worker", "run_payload"]

#: Threads per worker process for sync task bodies and callback posts.
THREADS = 32


class _Runner:
    """This process's event loop and thread pool for payloads (a forked horse makes its own).

    Reused from job to job where the process lives on (``SimpleWorker``): no loop, thread
    or callback connection is set up again per job.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.pool = concurrent.futures.ThreadPoolExecutor(THREADS, thread_name_prefix="wove-rq-task")
        self.loop = asyncio.new_event_loop()
        self.loop.set_default_executor(self.pool)

    def run(self, payload: dict[str, Any]) -> dict[str, Any]:
        task = self.loop.create_task(run_engine_payload(payload, executor=self.pool))
        return self.loop.run_until_complete(task)


_runner: _Runner | None = None
_runner_lock = threading.Lock()


def run_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """The RQ job function: run a Wove backend payload and return its engine status.

    The run's events go to the payload's callback URL; the returned
    :func:`wove.backend.engine_status` (the job's result) also carries the terminal event
    when the worker could not post it, so the caller gets it through RQ.

    Raises:
        ValueError: the payload lacks its callback URL or ids.
    """
    global _runner
    with _runner_lock:
        if _runner is None or _runner.pid != os.getpid():
            _runner = _Runner()
        runner = _runner
    if not runner.lock.acquire(blocking=False):  # called from two threads at once: run this one apart
        return run_engine_payload_sync(payload)
    try:
        return runner.run(payload)
    except BaseException:
        # RQ's job_timeout (an exception raised by a signal handler) or an interpreter
        # shutdown left the loop mid-run: the next job gets a fresh one.
        with _runner_lock:
            if _runner is runner:
                _runner = None
        raise
    finally:
        runner.lock.release()


def _flush_telemetry() -> None:
    """Export the spans a work horse buffered before RQ ends it with ``os._exit``.

    Only when the process set up OpenTelemetry (``opentelemetry.trace`` imported and a
    provider with ``force_flush``): a forked horse's batch span processor would otherwise
    lose every span of its job.
    """
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return
    flush = getattr(trace.get_tracer_provider(), "force_flush", None)
    if callable(flush):
        try:
            flush(5000)
        except Exception:  # telemetry must never fail a job
            pass


class Worker(_RQWorker):  # type: ignore[misc]
    """``rq.Worker`` (a work horse forked per job) with Wove's payload runner preloaded.

    A work horse exports its buffered OpenTelemetry spans after its job (RQ ends it with
    ``os._exit``, which would drop them).
    """

    def perform_job(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().perform_job(*args, **kwargs)
        finally:
            if os.getpid() != self._wove_parent_pid:
                _flush_telemetry()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._wove_parent_pid = os.getpid()


class SimpleWorker(_RQSimpleWorker):  # type: ignore[misc]
    """``rq.SimpleWorker`` (jobs in the worker process itself) with Wove's payload runner preloaded."""
