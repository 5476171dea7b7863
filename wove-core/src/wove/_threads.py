"""A thread pool whose threads never keep the process alive.

``concurrent.futures.ThreadPoolExecutor`` joins its threads when the interpreter exits,
so one sync task stuck in ``time.sleep(3600)`` (after its run timed out, or was cancelled:
Python cannot interrupt a running thread) keeps a worker service, or a script that used
the ``local`` executor, alive for an hour. This pool's threads are daemon threads that
nothing joins: a run that was given up on is abandoned with the process, not waited for.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

__all__ = ["DaemonThreadPool"]

T = TypeVar("T")

_STOP = None


class DaemonThreadPool(Executor):
    """At most ``max_threads`` daemon threads, started only when no idle one is waiting.

    Args:
        max_threads: the most threads running calls at once.
        name: thread name prefix (shown in tracebacks and ``py-spy dump``).
    """

    def __init__(self, max_threads: int, name: str = "wove") -> None:
        if max_threads < 1:
            raise ValueError(f"max_threads must be at least 1, got {max_threads}")
        self._max = max_threads
        self._name = name
        self._work: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]] | None] = (
            queue.SimpleQueue()
        )
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        self._shutdown = False

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new calls after shutdown")
            self._work.put((future, fn, args, kwargs))
            if self._idle > 0:
                self._idle -= 1  # that thread takes this item
            elif self._threads < self._max:
                self._threads += 1
                thread = threading.Thread(target=self._loop, name=f"{self._name}-{self._threads}", daemon=True)
                thread.start()
        return future

    def _loop(self) -> None:
        work = self._work
        while True:
            item = work.get()
            if item is _STOP:
                return
            future, fn, args, kwargs = item
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            del item, future, fn, args, kwargs  # drop references to the call before waiting
            with self._lock:
                self._idle += 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking calls; threads end once they finish what they run. ``wait`` is
        honoured only for threads that are idle: a stuck call is never waited for."""
        with self._lock:
            if self._shutdown:
                return
            self._shutdown = True
            if cancel_futures:
                while True:
                    try:
                        item = self._work.get_nowait()
                    except queue.Empty:
                        break
                    if item is not _STOP:
                        item[0].cancel()
            for _ in range(self._threads):
                self._work.put(_STOP)
