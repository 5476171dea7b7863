"""The submitting side's Celery calls, all on one thread per executor.

Celery's result consumers (a Redis pub/sub connection, an ``rpc://`` reply queue named per
thread) are not thread-safe and must be drained by the thread that subscribed, so every
Celery call of an executor (send, watch, revoke, read a stored state) runs on one daemon
thread. The event loop hands it jobs and gets their outcome as futures; the thread
drains the result backend between jobs and reports each watched task's final state to a
callback, which hands it to the loop.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import select
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["ASYNC_POLL_SECONDS", "STORE_POLL_SECONDS", "CeleryThread", "backend_kind"]

logger = logging.getLogger(__name__)

#: Seconds between drains of a result backend that pushes results (Redis, rpc) while
#: tasks are watched (between jobs it is drained at once).
ASYNC_POLL_SECONDS = 0.01
#: Seconds between reads of each watched task's state in other result backends.
STORE_POLL_SECONDS = 0.5
#: Most messages taken from the result backend in one drain.
DRAIN_BUDGET = 512

#: (celery task id, state, result or exception, traceback text or None)
Ready = Callable[[str, str, Any, "str | None"], None]


def backend_kind(backend: Any) -> str:
    """How results are read: ``none`` (disabled), ``rpc``, ``push`` (Redis...), or ``poll``.

    ``rpc`` and ``push`` backends deliver results to a consumer (``rpc`` only to the thread
    that sent the task); ``poll`` backends are read task by task. Only ``push`` and
    ``poll`` backends store a state that any client can read later.
    """
    from celery.backends.asynchronous import AsyncBackendMixin
    from celery.backends.base import DisabledBackend
    from celery.backends.rpc import RPCBackend

    if isinstance(backend, DisabledBackend):
        return "none"
    if isinstance(backend, RPCBackend):
        return "rpc"
    if isinstance(backend, AsyncBackendMixin):
        return "push"
    return "poll"


def _release(result: Any) -> None:
    """Detach a finished or forgotten ``AsyncResult`` from its backend.

    ``AsyncResult.__del__`` unsubscribes its task id from the backend's result consumer.
    Results sit in reference cycles (their ``on_ready`` promise), so the cyclic garbage
    collector destroys them at arbitrary moments: in another thread (the consumer is not
    thread-safe) or in the middle of a Redis command on the same pub/sub connection, where
    the nested ``UNSUBSCRIBE`` deadlocks. Its subscription is already gone here.
    """
    result.backend = None


class CeleryThread:
    """One daemon thread that makes every Celery call of an executor.

    Args:
        app: the Celery application.
        name: for the thread's name.
        on_ready: called on this thread with a watched task's final state.
    """

    def __init__(self, app: Any, name: str, on_ready: Ready) -> None:
        self.app = app
        self._on_ready = on_ready
        self._jobs: queue.SimpleQueue[tuple[concurrent.futures.Future[Any], Callable[[], Any]] | None] = (
            queue.SimpleQueue())
        self._watched: dict[str, Any] = {}
        self._messages = 0
        self._next_poll = 0.0
        self._rpc_connection: Any = None
        self._rpc_consumer: Any = None
        self.kind = "none"
        self._thread = threading.Thread(target=self._main, name=f"wove-celery-{name}", daemon=True)
        self._thread.start()

    # -- called from any thread ------------------------------------------------------------
    def call(self, job: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        """Run ``job`` on the Celery thread; its outcome comes back in the future."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        if not self._thread.is_alive():
            future.set_exception(RuntimeError("the executor's Celery thread has stopped"))
            return future
        self._jobs.put((future, job))
        return future

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the jobs already queued (bounded)."""
        self._jobs.put(None)
        self._thread.join(timeout)

    # -- called on the Celery thread (from jobs) -------------------------------------------
    @property
    def backend(self) -> Any:
        return self.app.backend

    def setup(self) -> str:
        """Pick how results are read; return :func:`backend_kind`."""
        self.kind = backend_kind(self.backend)
        if self.kind == "rpc":
            self._rpc_consume()
        elif self.kind == "push":
            consumer = self.backend.result_consumer
            previous = consumer.on_message

            def count(meta: Any) -> None:
                self._messages += 1
                if previous is not None:
                    previous(meta)

            consumer.on_message = count
        return self.kind

    def _rpc_consume(self) -> None:
        """Consume this thread's ``rpc://`` reply queue (where workers send the results of
        the tasks this thread sent) with a consumer of our own: Celery's drops its queue
        whenever one result is fulfilled."""
        import kombu

        self._rpc_close()
        backend = self.backend
        self._rpc_connection = self.app.connection_for_read()
        self._rpc_consumer = kombu.Consumer(self._rpc_connection.default_channel, [backend.binding],
                                            callbacks=[self._rpc_message], accept=backend.accept, no_ack=True)
        self._rpc_consumer.consume()

    def _rpc_close(self) -> None:
        connection = getattr(self, "_rpc_connection", None)
        self._rpc_connection = self._rpc_consumer = None
        if connection is not None:
            try:
                connection.close()
            except Exception as exc:
                logger.debug("closing the rpc result connection failed: %r", exc)

    def _rpc_message(self, body: Any, message: Any) -> None:
        self._messages += 1
        meta = self.backend.meta_from_decoded(body)
        task_id = str(meta.get("task_id") or message.properties.get("correlation_id"))
        state = str(meta.get("status"))
        from celery import states

        result = self._watched.pop(task_id, None) if state in states.READY_STATES else None
        if result is not None:
            _release(result)
            self._on_ready(task_id, state, meta.get("result"), meta.get("traceback"))

    def close(self) -> None:
        """Release the thread's own connections (run it as the last job)."""
        self._rpc_close()

    def watch(self, task_id: str, *, existing: bool = False) -> None:
        """Report ``task_id``'s final state to ``on_ready``.

        Call it before sending the task; for a task sent earlier (``existing``), the state
        is read once more after subscribing, so a result stored in between is not missed.
        """
        if self.kind == "none" or task_id in self._watched:
            return
        self.adopt(self.app.AsyncResult(task_id))
        if existing:
            self._watched[task_id].ready()  # a final state fulfils the result now (_fulfilled)

    def adopt(self, result: Any) -> None:
        """Watch the ``AsyncResult`` that ``send_task`` returned (it subscribed before sending).

        The watched result is kept: Celery unsubscribes a task id when *any* of its
        ``AsyncResult`` objects is garbage-collected.
        """
        if self.kind == "none":
            return
        self._watched[str(result.id)] = result
        if self.kind != "rpc":  # rpc: our own consumer reports it (_rpc_message)
            result.then(self._fulfilled, self._broken)

    def forget(self, task_id: str) -> None:
        """Stop watching ``task_id`` (nobody waits for it any more)."""
        result = self._watched.pop(task_id, None)
        if result is not None and self.kind == "push":
            try:
                self.backend.remove_pending_result(result)
            except Exception as exc:  # the consumer reconnects on its own
                logger.debug("forgetting Celery task %s failed: %r", task_id, exc)
        if result is not None:
            _release(result)

    @property
    def watched(self) -> int:
        return len(self._watched)

    def _fulfilled(self, result: Any) -> None:
        task_id = str(result.id)
        if self._watched.pop(task_id, None) is None:
            return
        try:
            state, value, trace = result.state, result.result, result.traceback
        except Exception as exc:  # a result that does not decode: say so rather than wait forever
            state, value, trace = "FAILURE", exc, None
        _release(result)
        self._on_ready(task_id, str(state), value, trace)

    def _broken(self, exc: BaseException) -> None:
        logger.warning("a Celery result callback failed: %r", exc)

    # -- the thread ----------------------------------------------------------------------
    def _main(self) -> None:
        while True:
            timeout: float | None = None
            if self._watched:
                timeout = ASYNC_POLL_SECONDS if self.kind in ("rpc", "push") else max(
                    0.0, self._next_poll - time.monotonic())
            try:
                item = self._jobs.get(timeout=timeout)
            except queue.Empty:
                item = ()  # type: ignore[assignment]
            while item:
                if item is None:
                    return
                future, job = item
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(job())
                    except BaseException as exc:
                        future.set_exception(exc)
                try:
                    item = self._jobs.get_nowait()
                except queue.Empty:
                    break
            if item is None:
                return
            if self._watched:
                try:
                    self._drain()
                except Exception as exc:
                    logger.warning("reading Celery results failed (retrying): %r", exc)
                    time.sleep(ASYNC_POLL_SECONDS)

    def _drain(self) -> None:
        if self.kind == "push":
            consumer = self.backend.result_consumer
            for _ in range(DRAIN_BUDGET):
                before = self._messages
                consumer.drain_events(timeout=0)
                if self._messages == before:
                    break
        elif self.kind == "rpc":
            if self._rpc_connection is None:
                self._rpc_consume()
            assert self._rpc_connection is not None
            try:
                sock = self._rpc_connection.connection.sock
                for _ in range(DRAIN_BUDGET):
                    # never wait on an idle socket: jobs (sends) are waiting behind this drain
                    if not select.select([sock], [], [], 0)[0]:
                        break
                    self._rpc_connection.drain_events(timeout=1.0)
            except TimeoutError:
                pass
            except Exception:
                self._rpc_close()  # reconnect on the next drain
                raise
        elif time.monotonic() >= self._next_poll:
            self._next_poll = time.monotonic() + STORE_POLL_SECONDS
            for result in list(self._watched.values()):
                result.ready()  # reads the state; a final one fulfils the result (_fulfilled)
