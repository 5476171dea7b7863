"""What runs inside a Celery worker: one Wove payload per Celery task.

Each worker process (the prefork pool's children, or the one process of the threads,
solo, eventlet or gevent pools) keeps one event loop on a daemon thread, started on the
first payload (after a fork, afresh). A payload runs there through the shared machinery
(:func:`wove.backend.run_engine_payload`, the one worker engine every service uses),
while the Celery pool thread that received the task serves the run's *sync* callable
itself: Celery's concurrency, time limits and ``revoke(terminate=True)`` (which signals
the pool process) then apply to the Wove task as to any Celery task, and an async task
shares the process's loop.

Cancellation reaches a running payload without ``terminate``: Celery does not tell a
running task that it was revoked, so a timer on the loop checks the worker's revoked set
(the threads and solo pools share it with the consumer) and, for key-value result
backends (Redis...), the task's stored state, which the submitting side sets to
``REVOKED`` when it cancels.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

from wove.backend import engine_status, post_event, run_engine_payload
from wove.protocol import error_event

__all__ = ["CANCEL_POLL_SECONDS", "run_payload"]

logger = logging.getLogger(__name__)

#: Seconds between checks whether a running payload's Celery task was revoked.
CANCEL_POLL_SECONDS = 0.25


class _PoolThread(concurrent.futures.Executor):
    """An executor whose jobs run on the Celery pool thread that waits in :meth:`serve`."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[concurrent.futures.Future[Any], Callable[..., Any]] | None] = (
            queue.SimpleQueue())

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._jobs.put((future, functools.partial(fn, *args, **kwargs)))
        return future

    def finish(self) -> None:
        """Let :meth:`serve` return (once the job it runs, if any, is done)."""
        self._jobs.put(None)

    def serve(self) -> None:
        """Run jobs on this thread until :meth:`finish`."""
        while True:
            item = self._jobs.get()
            if item is None:
                return
            future, job = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(job())
            except BaseException as exc:
                future.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise  # SystemExit, Celery's SoftTimeLimitExceeded... belong to the pool thread


class _Process:
    """This worker process's event loop and the runs it is executing."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="wove-celery-loop", daemon=True)
        self.thread.start()
        #: Celery task id -> (the run's cancel event, the task's backend)
        self.running: dict[str, tuple[asyncio.Event, Any]] = {}
        self.watcher: asyncio.TimerHandle | None = None

    def watch(self) -> None:
        if self.watcher is None and self.running:
            self.watcher = self.loop.call_later(CANCEL_POLL_SECONDS, self._check)

    def _check(self) -> None:
        self.watcher = None
        if self.running:
            asyncio.ensure_future(self._check_revoked(), loop=self.loop)

    async def _check_revoked(self) -> None:
        try:
            revoked = _revoked_here(list(self.running))
            by_backend: dict[int, tuple[Any, list[str]]] = {}
            for task_id, (_event, backend) in self.running.items():
                if task_id not in revoked and _stores_state(backend):
                    by_backend.setdefault(id(backend), (backend, []))[1].append(task_id)
            for backend, ids in by_backend.values():
                revoked |= await self.loop.run_in_executor(None, _revoked_in_backend, backend, ids)
            for task_id in revoked:
                entry = self.running.get(task_id)
                if entry is not None and not entry[0].is_set():
                    logger.info("Celery task %s was revoked: cancelling its Wove run", task_id)
                    entry[0].set()
        except Exception as exc:  # a flaky backend must not stop the checks
            logger.warning("checking Celery tasks %s for revocation failed: %r", list(self.running)[:5], exc)
        finally:
            self.watch()


def _revoked_here(task_ids: list[str]) -> set[str]:
    try:
        from celery.worker import state
    except ImportError:  # pragma: no cover - celery is a dependency
        return set()
    return {task_id for task_id in task_ids if task_id in state.revoked}


def _stores_state(backend: Any) -> bool:
    from celery.backends.base import BaseKeyValueStoreBackend

    return isinstance(backend, BaseKeyValueStoreBackend)


def _revoked_in_backend(backend: Any, task_ids: list[str]) -> set[str]:
    values = backend.mget([backend.get_key_for_task(task_id) for task_id in task_ids])
    revoked = set()
    for task_id, value in zip(task_ids, values):
        if value:
            meta = backend.decode_result(value)
            if isinstance(meta, dict) and meta.get("status") == "REVOKED":
                revoked.add(task_id)
    return revoked


_process: _Process | None = None
_process_lock = threading.Lock()


def _here() -> _Process:
    global _process
    with _process_lock:
        if _process is None or _process.pid != os.getpid():  # first payload, or a forked child
            _process = _Process()
        return _process


async def _run(process: _Process, payload: dict[str, Any], task_id: str, backend: Any,
               threads: concurrent.futures.Executor) -> dict[str, Any]:
    cancel = asyncio.Event()
    process.running[task_id] = (cancel, backend)
    process.watch()
    try:
        return await run_engine_payload(payload, cancel_event=cancel, executor=threads)
    finally:
        process.running.pop(task_id, None)


def _lost_before(payload: dict[str, Any], task_id: str, backend: Any) -> dict[str, Any] | None:
    """For a message the broker delivered again: the status to return instead of running it, if any.

    The broker re-delivers an unacknowledged message when the worker holding it died
    (``acks_late``). A run that had already *started* there (its stored state says so)
    runs again only under orphan policy ``requeue``; otherwise it ends with a
    ``task_error`` (source ``transport``). A message that was only prefetched runs normally.
    """
    raw = payload.get("delivery")
    delivery: dict[str, Any] = raw if isinstance(raw, dict) else {}
    if delivery.get("delivery_orphan_policy") == "requeue" or not _stores_state(backend):
        return None
    try:
        state = backend.get_task_meta(task_id).get("status")
    except Exception as exc:
        logger.warning("reading the state of re-delivered Celery task %s failed (%r); running it", task_id, exc)
        return None
    if state != "STARTED":
        return None
    run_id, wove_task = str(payload.get("run_id")), str(payload.get("task_id"))
    policy = delivery.get("delivery_orphan_policy") or "the default"
    event = error_event(
        run_id, wove_task, kind="WorkerLostError", source="transport", retryable=True,
        message=(f"celery executor: the Celery worker that was running Celery task {task_id} (run {run_id}) died "
                 f"before it finished, and the broker delivered the task again; orphan policy {policy!r} does not "
                 "run it twice (delivery_orphan_policy='requeue' would)."))
    posted = False
    channel = payload.get("result_channel", "callback")
    if channel != "engine" and isinstance(payload.get("callback_url"), str):
        try:
            post_event(payload["callback_url"], event, key=payload.get("callback_key"), ca=payload.get("callback_ca"))
            posted = True
        except OSError as exc:
            logger.info("posting the lost-run error of %s failed (%r); it travels in the Celery result", run_id, exc)
    return engine_status(event, posted)


def run_payload(payload: dict[str, Any], request: Any, backend: Any) -> dict[str, Any]:
    """Run a Wove backend payload as the Celery task of ``request``; return its engine status.

    The status (see :func:`wove.backend.engine_status`) is the Celery task's result: small
    when the run's outcome reached the caller's callback server, otherwise carrying the
    outcome, which the caller reads from the result backend.

    Raises:
        TypeError: ``payload`` is not a dict (not a Wove payload).
        ValueError: the payload lacks its callback URL or ids.
    """
    if not isinstance(payload, dict):
        raise TypeError(f"wove.run_backend_payload takes one Wove backend payload (a dict), got "
                        f"{type(payload).__name__}; send tasks to it with the celery executor of Wove.")
    task_id = str(request.id)
    if (getattr(request, "delivery_info", None) or {}).get("redelivered"):
        status = _lost_before(payload, task_id, backend)
        if status is not None:
            return status
    process = _here()
    threads = _PoolThread()
    future = asyncio.run_coroutine_threadsafe(_run(process, payload, task_id, backend, threads), process.loop)
    future.add_done_callback(lambda _future: threads.finish())
    try:
        threads.serve()
    except BaseException:
        entry = process.running.get(task_id)
        if entry is not None:  # the pool thread is being stopped: stop the run too
            process.loop.call_soon_threadsafe(entry[0].set)
        raise
    return future.result()
