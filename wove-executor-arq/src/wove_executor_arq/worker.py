"""What arq workers run: ``wove_run_backend_payload`` (Wove 2.x's function name) and worker settings.

Run a worker with Wove's settings::

    WOVE_ARQ_REDIS_URL=redis://127.0.0.1:6379/0 arq wove_executor_arq.worker.WorkerSettings

or build your own settings with :func:`worker_settings` (arq reads only a settings class's
own attributes, so subclassing ``WorkerSettings`` would lose them)::

    # myworker.py, run with: arq myworker.WorkerSettings
    from arq.connections import RedisSettings
    from wove_executor_arq.worker import worker_settings

    WorkerSettings = worker_settings(redis_settings=RedisSettings(host="redis"), max_jobs=20,
                                     functions=[my_other_function])

or add :data:`FUNCTIONS` to your own ``WorkerSettings.functions`` (and set
``allow_abort_jobs = True`` so that cancelling a run aborts its job).

Wove 2.x clients enqueue ``wove_run_backend_payload`` too; their payloads run here unchanged.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import socket
from typing import Any

from arq.connections import RedisSettings
from arq.worker import func

from wove.backend import run_engine_payload

from .adapter import (
    ALIVE_KEY_PREFIX,
    ALIVE_REFRESH_SECONDS,
    ALIVE_TTL_SECONDS,
    DEFAULT_FUNCTION_NAME,
)

__all__ = ["FUNCTIONS", "WorkerSettings", "worker_settings", "wove_run_backend_payload"]

#: Threads per worker process for sync task bodies.
THREADS = 32
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_pid = 0


def _threads() -> concurrent.futures.ThreadPoolExecutor:
    """This process's thread pool for sync task bodies (one per process, shared by its jobs)."""
    global _pool, _pool_pid
    if _pool is None or _pool_pid != os.getpid():
        _pool, _pool_pid = concurrent.futures.ThreadPoolExecutor(THREADS, thread_name_prefix="wove-arq-task"), os.getpid()
    return _pool


async def _keep_alive(redis: Any, key: str, value: str) -> None:
    while True:
        try:
            await redis.set(key, value, px=int(ALIVE_TTL_SECONDS * 1000))
        except Exception:  # a Redis hiccup: the next refresh tries again
            pass
        await asyncio.sleep(ALIVE_REFRESH_SECONDS)


async def wove_run_backend_payload(ctx: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
    """The arq job function: run a Wove backend payload; return its engine status (the job's result).

    The run's events go to the payload's callback URL; the returned
    :func:`wove.backend.engine_status` also carries the terminal event when the worker
    could not post it, so the caller gets it through arq. While the job runs, the key
    ``wove:arq:alive:<job id>`` is kept fresh (so the caller can tell a dead worker from a
    long task). Sync task bodies run on a thread pool per worker process; an arq abort
    cancels the run.

    Raises:
        ValueError: the payload lacks its callback URL or ids.
    """
    redis, job_id = ctx.get("redis"), ctx.get("job_id")
    keeper = None
    if redis is not None and job_id:
        keeper = asyncio.ensure_future(_keep_alive(redis, ALIVE_KEY_PREFIX + str(job_id),
                                                   f"{socket.gethostname()}:{os.getpid()}"))
    try:
        return await run_engine_payload(payload, executor=_threads())
    finally:
        if keeper is not None:
            keeper.cancel()


#: The arq functions a worker needs to run Wove payloads (add them to ``WorkerSettings.functions``).
FUNCTIONS = [func(wove_run_backend_payload, name=DEFAULT_FUNCTION_NAME)]


def worker_settings(**settings: Any) -> dict[str, Any]:
    """arq worker settings (a dict, which ``arq`` accepts like a class) that run Wove payloads.

    Wove's defaults, then ``settings`` (any ``arq.worker.Worker`` argument): ``functions``
    are added to :data:`FUNCTIONS`; ``allow_abort_jobs`` is on (cancelling a run aborts its
    job) and ``job_timeout`` is an hour (arq's default of 300 s would end longer tasks).
    """
    merged: dict[str, Any] = {"allow_abort_jobs": True, "job_timeout": 3600, **settings}
    merged["functions"] = [*FUNCTIONS, *settings.get("functions", ())]
    return merged


class WorkerSettings:
    """arq worker settings that run Wove payloads (``arq wove_executor_arq.worker.WorkerSettings``).

    Redis and the queue come from ``$WOVE_ARQ_REDIS_URL`` (default
    ``redis://localhost:6379``) and ``$WOVE_ARQ_QUEUE`` (default ``arq:queue``), read when
    this module is imported; for more, build settings with :func:`worker_settings`.
    ``allow_abort_jobs`` is on and ``job_timeout`` is an hour, as there.
    """

    functions = FUNCTIONS
    allow_abort_jobs = True
    job_timeout = 3600
    redis_settings = RedisSettings.from_dsn(os.environ.get("WOVE_ARQ_REDIS_URL", "redis://localhost:6379"))
    queue_name = os.environ.get("WOVE_ARQ_QUEUE", "arq:queue")
