"""What taskiq workers run: the task ``wove.run_backend_payload`` (Wove 2.x's name).

Register it on your broker (the same broker object the workers load)::

    # tasks.py, run with: taskiq worker tasks:broker
    from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend
    from wove_executor_taskiq.worker import register

    broker = ListQueueBroker("redis://redis:6379/0").with_result_backend(
        RedisAsyncResultBackend("redis://redis:6379/0"))
    register(broker)

or run the ready-made broker, configured from the environment::

    WOVE_TASKIQ_REDIS_URL=redis://127.0.0.1:6379/0 taskiq worker wove_executor_taskiq.worker:broker

The broker needs a result backend: the task's result carries the run's outcome when the
worker cannot reach the callback server, and its progress carries the task's liveness beats
and the caller's cancel requests. Wove 2.x clients send ``wove.run_backend_payload`` too;
their payloads run here unchanged.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import socket
from typing import Any

from taskiq import AsyncBroker, Context, TaskiqDepends
from taskiq.depends.progress_tracker import TaskProgress

from wove.backend import engine_status, run_engine_payload

from .adapter import BEAT_SECONDS, BEAT_STATE, CANCEL_PREFIX, CANCEL_STATE, DEFAULT_TASK_NAME

__all__ = ["broker", "register", "run_backend_payload"]

#: Threads per worker process for sync task bodies.
THREADS = 32
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_pid = 0


def _threads() -> concurrent.futures.ThreadPoolExecutor:
    global _pool, _pool_pid
    if _pool is None or _pool_pid != os.getpid():
        _pool = concurrent.futures.ThreadPoolExecutor(THREADS, thread_name_prefix="wove-taskiq-task")
        _pool_pid = os.getpid()
    return _pool


async def _cancel_requested(backend: Any, task_id: str) -> bool:
    progress = await backend.get_progress(CANCEL_PREFIX + task_id)
    return getattr(progress, "state", None) == CANCEL_STATE


_clients: dict[int, Any] = {}


def _redis(backend: Any) -> Any:
    """One redis client per taskiq-redis result backend (None for other backends)."""
    pool = getattr(backend, "redis_pool", None)
    if pool is None or not hasattr(backend, "serializer") or not hasattr(TaskProgress, "model_dump"):
        return None  # another result backend, or pydantic 1: its own set_progress/get_progress
    client = _clients.get(id(pool))
    if client is None:
        from redis.asyncio import Redis

        client = _clients[id(pool)] = Redis(connection_pool=pool)
    return client


async def _beat_once(backend: Any, task_id: str, beat: int, attempt: int) -> bool:
    """Write liveness beat ``beat``; True when the caller asked the task to stop.

    With a taskiq-redis result backend both go in one pipelined round trip (the keys and
    encoding of its ``set_progress`` / ``get_progress``).
    """
    worker = f"{socket.gethostname()}:{os.getpid()}"
    progress = TaskProgress(state=BEAT_STATE, meta={"beat": beat, "attempt": attempt, "worker": worker})
    redis = _redis(backend)
    if redis is None:
        _, stop = await asyncio.gather(backend.set_progress(task_id, progress), _cancel_requested(backend, task_id))
        return bool(stop)
    prefix = getattr(backend, "prefix_str", None)

    def key(name: str) -> str:
        return (f"{prefix}:{name}" if prefix else name) + "__progress"

    expiry: dict[str, int] = {}
    if getattr(backend, "result_ex_time", None):
        expiry["ex"] = backend.result_ex_time
    elif getattr(backend, "result_px_time", None):
        expiry["px"] = backend.result_px_time
    async with redis.pipeline(transaction=False) as pipe:
        pipe.set(key(task_id), backend.serializer.dumpb(progress.model_dump()), **expiry)
        pipe.get(key(CANCEL_PREFIX + task_id))
        _, cancel = await pipe.execute()
    if cancel is None:
        return False
    return getattr(TaskProgress[Any].model_validate(backend.serializer.loadb(cancel)), "state", None) == CANCEL_STATE


async def _beat(backend: Any, task_id: str, attempt: int, cancel: asyncio.Event) -> None:
    """Write a liveness beat every :data:`BEAT_SECONDS`; set ``cancel`` when the caller asks."""
    beat = 1
    while True:
        await asyncio.sleep(BEAT_SECONDS)
        beat += 1
        try:
            if await _beat_once(backend, task_id, beat, attempt):
                cancel.set()
                return
        except Exception:  # a result-backend hiccup: the next beat tries again
            pass


#: taskiq's dependency marker for the task's :class:`taskiq.Context`.
_CONTEXT: Any = TaskiqDepends()


async def run_backend_payload(payload: dict[str, Any], context: Context = _CONTEXT) -> dict[str, Any]:
    """The taskiq task: run a Wove backend payload; return its engine status (the task's result).

    The run's events go to the payload's callback URL; the returned
    :func:`wove.backend.engine_status` also carries the terminal event when the worker
    could not post it. While it runs, the task's progress holds liveness beats, and a
    cancel request from the caller (the progress of ``wove-cancel:<task id>``) cancels the
    run. Sync task bodies run on a thread pool per worker process.

    Raises:
        ValueError: the payload lacks its callback URL or ids.
    """
    task_id = context.message.task_id
    backend = context.broker.result_backend
    attempt = int(payload.get("attempt") or 1) if isinstance(payload, dict) else 1
    if await _beat_once(backend, task_id, 1, attempt):  # cancelled while it waited in the queue
        return engine_status({"type": "task_cancelled", "run_id": payload.get("run_id"),
                              "task_id": payload.get("task_id")}, False)
    cancel = asyncio.Event()
    beats = asyncio.ensure_future(_beat(backend, task_id, attempt, cancel))
    try:
        return await run_engine_payload(payload, cancel_event=cancel, executor=_threads())
    finally:
        beats.cancel()


def register(broker: AsyncBroker, task_name: str = DEFAULT_TASK_NAME) -> Any:
    """Register Wove's task on ``broker`` under ``task_name``; return the task.

    Use the same ``task_name`` as the executor's ``executor_config.task_name`` (both
    default to Wove 2.x's ``wove.run_backend_payload``).
    """
    return broker.register_task(run_backend_payload, task_name=task_name)


def _default_broker() -> AsyncBroker:
    from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend

    url = os.environ.get("WOVE_TASKIQ_REDIS_URL", "redis://localhost:6379")
    queue = os.environ.get("WOVE_TASKIQ_QUEUE", "taskiq")
    made: AsyncBroker = ListQueueBroker(url, queue_name=queue).with_result_backend(RedisAsyncResultBackend(url))
    register(made)
    return made


#: A taskiq-redis broker (``ListQueueBroker`` with a ``RedisAsyncResultBackend``) on
#: ``$WOVE_TASKIQ_REDIS_URL`` (default ``redis://localhost:6379``) and queue
#: ``$WOVE_TASKIQ_QUEUE`` (default ``taskiq``), with Wove's task registered:
#: ``taskiq worker wove_executor_taskiq.worker:broker``.
broker = _default_broker()
