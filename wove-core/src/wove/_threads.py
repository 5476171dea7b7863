"""A thread pool whose threads never keep the process alive, and that hands results back
to an event loop in batches.

``concurrent.futures.ThreadPoolExecutor`` joins its threads when the interpreter exits,
so one sync task stuck in ``time.sleep(3600)`` (after its run timed out, or was cancelled:
Python cannot interrupt a running thread) keeps a worker service, or a script that used
the ``local`` executor, alive for an hour. This pool's threads are daemon threads that
nothing joins: a run that was given up on is abandoned with the process, not waited for.

``loop.run_in_executor`` wakes the loop once per finished call (a ``concurrent.futures``
future, a wrapper future and a ``call_soon_threadsafe`` each). :meth:`DaemonThreadPool.run`
instead resolves an asyncio future directly and queues it: the first result of a batch
wakes the loop, the ones that finish before the loop runs ride along, so with many sync
calls in flight one wake-up delivers many results (measured: 7-8x the calls per second of
``run_in_executor`` for no-op calls with 256 in flight).
"""

from __future__ import annotations

import asyncio
import collections
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

__all__ = ["DaemonThreadPool", "call_in_thread", "future_exception"]

T = TypeVar("T")

_STOP = None
#: Results resolved per loop iteration. A burst of hundreds of results resolved at once
#: wakes hundreds of tasks in one step; when they release an ``asyncio.Semaphore`` that
#: many others wait on (the usual way to bound concurrency), each release scans past the
#: waiters woken before it and not yet run (CPython 3.10-3.13), quadratic in the burst.
#: Measured with 256 sync no-op calls in flight (the team benchmark's ``local`` throughput,
#: behind a semaphore, CPython 3.11 and 3.12): 16 and 64 per step run alike, 256 costs a
#: fifth more CPU per call. A worker service, whose results become events that go out
#: together, gains from the larger batch: with 64 its sends drop by a quarter and its
#: loop spends a tenth less per run than with 16 (WebSocket no-ops, 256 in flight).
DELIVER_PER_STEP = 64


#: Seconds between the pool's checks for calls that wait while every thread is busy:
#: longer than the interpreter's switch interval (5 ms), within which a busy event loop
#: may keep the GIL from every pool thread (that is not a thread stuck in a slow call).
INJECT_INTERVAL = 0.012
#: Threads started at most per check.
INJECT_BATCH = 8


class DaemonThreadPool(Executor):
    """At most ``max_threads`` daemon threads, started as calls need them.

    Up to ``eager`` threads (default: the number of CPUs, at least 2) start as soon as a
    call finds no idle thread. Beyond that a thread is added only when calls wait and no
    thread started a call for :data:`INJECT_INTERVAL` seconds (every thread is blocked in
    a slow call): up to :data:`INJECT_BATCH` per check. Quick calls, however many are in
    flight, are then served by a few threads (64 threads taking turns at the GIL for no-op
    calls cost twice the CPU of two), and blocking calls still get a thread each within
    milliseconds (32 concurrent ``time.sleep(0.2)`` finish in about 0.25 s).

    Args:
        max_threads: the most threads running calls at once.
        name: thread name prefix (shown in tracebacks and ``py-spy dump``).
        eager: threads started without waiting (at most ``max_threads``).
    """

    def __init__(self, max_threads: int, name: str = "wove", *, eager: int | None = None) -> None:
        if max_threads < 1:
            raise ValueError(f"max_threads must be at least 1, got {max_threads}")
        self._max = max_threads
        self._eager = min(max_threads, eager if eager is not None else max(2, os.cpu_count() or 2))
        self._name = name
        #: calls taken by a thread so far (the injector's measure of progress)
        self._started = 0
        self._backlog = threading.Event()  # calls wait beyond the eager threads: the injector watches
        self._injector: threading.Thread | None = None
        # (future, fn, args, kwargs); the future is a concurrent.futures.Future (submit)
        # or an asyncio.Future of self._loop (run)
        self._work: queue.SimpleQueue[tuple[Any, Callable[..., Any], tuple[Any, ...], dict[str, Any]] | None] = (
            queue.SimpleQueue()
        )
        self._lock = threading.Lock()
        self._threads = 0
        # Every queued call is claimed by one thread: an idle one (``_idle`` counts the
        # threads that will take a call without a new one starting), a thread started for
        # it, or none yet (``_unclaimed``: it waits for a busy thread to finish, or for the
        # injector to start one).
        self._idle = 0
        self._unclaimed = 0
        self._shutdown = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._finished: collections.deque[tuple[asyncio.Future[Any], bool, Any]] = collections.deque()
        self._signalled = False

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        self._put(future, fn, args, kwargs)
        return future

    def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> asyncio.Future[T]:
        """Call ``fn`` in a thread; the returned future (of the running loop) gets its
        result. Cancelling the future does not stop a call that already runs."""
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:  # another loop: the per-call hand-off
            return loop.run_in_executor(self, _call_with(fn, args, kwargs))
        future: asyncio.Future[T] = loop.create_future()
        self._put(future, fn, args, kwargs)
        return future

    def _put(self, future: Any, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new calls after shutdown")
            self._work.put((future, fn, args, kwargs))
            if self._idle > 0:
                self._idle -= 1  # that thread takes this item
            elif self._threads < self._eager:
                self._start_thread()
            else:
                self._unclaimed += 1
                if self._threads >= self._max or self._backlog.is_set():
                    return
                self._backlog.set()
                if self._injector is None:
                    self._injector = threading.Thread(target=self._inject, name=f"{self._name}-injector", daemon=True)
                    self._injector.start()

    def _start_thread(self) -> None:
        """Start one worker thread (the lock is held)."""
        self._threads += 1
        threading.Thread(target=self._worker, name=f"{self._name}-{self._threads}", daemon=True).start()

    def _inject(self) -> None:
        """While calls wait beyond the eager threads: every :data:`INJECT_INTERVAL`, add
        threads if no thread started a call meanwhile (all of them are in slow calls)."""
        while True:
            self._backlog.wait()
            started = self._started
            time.sleep(INJECT_INTERVAL)
            with self._lock:
                if self._shutdown:
                    return
                waiting = self._unclaimed
                if waiting <= 0 or self._threads >= self._max:
                    self._backlog.clear()  # the next call that finds no idle thread sets it again
                    continue
                if self._started == started:
                    for _ in range(min(INJECT_BATCH, waiting, self._max - self._threads)):
                        self._start_thread()
                        self._unclaimed -= 1  # the new thread takes one of them

    def _worker(self) -> None:
        work = self._work
        finished = self._finished
        while True:
            item = work.get()
            if item is _STOP:
                return
            self._started += 1  # under the GIL; the injector only compares it with an older value
            future, fn, args, kwargs = item
            if isinstance(future, Future):
                if future.set_running_or_notify_cancel():
                    try:
                        result = fn(*args, **kwargs)
                    except BaseException as exc:
                        future.set_exception(future_exception(exc))
                    else:
                        future.set_result(result)
            elif not future.cancelled():
                try:
                    outcome = (future, True, fn(*args, **kwargs))
                except BaseException as exc:
                    outcome = (future, False, future_exception(exc))
                finished.append(outcome)
                if not self._signalled:  # the first of a batch wakes the loop; the rest ride along
                    self._signalled = True
                    assert self._loop is not None
                    try:
                        self._loop.call_soon_threadsafe(self._deliver)
                    except RuntimeError:  # the loop is closed: nobody waits for the result
                        finished.clear()
                del outcome
            del item, future, fn, args, kwargs  # drop references to the call before waiting
            with self._lock:
                if self._unclaimed > 0:
                    self._unclaimed -= 1  # this thread takes a call that waits for one
                else:
                    self._idle += 1

    def _deliver(self) -> None:
        """On the loop: resolve the futures whose call finished since the last wake-up, at
        most :data:`DELIVER_PER_STEP` per loop iteration (the rest in the next one)."""
        finished = self._finished
        for _ in range(DELIVER_PER_STEP):
            if not finished:
                break
            future, ok, value = finished.popleft()
            if future.cancelled():
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
        if finished:
            assert self._loop is not None
            self._loop.call_soon(self._deliver)  # still signalled: the threads need not wake us
        else:
            self._signalled = False  # a result queued from here on signals again
            if finished:  # one queued between the check and the flag: take it now
                self._signalled = True
                assert self._loop is not None
                self._loop.call_soon(self._deliver)

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
            self._backlog.set()  # the injector sees the shutdown and ends


def _call_with(fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Callable[[], T]:
    def call() -> T:
        return fn(*args, **kwargs)

    return call


def future_exception(exc: BaseException) -> BaseException:
    """``exc`` as an asyncio future can hold it: itself, but for a ``StopIteration``.

    An asyncio future refuses a ``StopIteration`` (``TypeError`` from ``set_exception``
    before Python 3.13, where the future handing a thread's outcome to the loop would then
    never resolve), and a coroutine turns one into ``RuntimeError`` (PEP 479). A sync task
    that raises it (``next()`` on an exhausted iterator, say) fails with a ``RuntimeError``
    instead, the original as its ``__cause__``, as Python 3.13 does.
    """
    if not isinstance(exc, StopIteration):
        return exc
    error = RuntimeError(
        f"The call raised StopIteration({', '.join(map(repr, exc.args))}), which cannot cross an await "
        "(PEP 479); it is this error's __cause__. Catch it in the task and return or raise something else."
    )
    error.__cause__ = exc
    return error


def call_in_thread(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` for an executor whose future asyncio then awaits
    (``loop.run_in_executor``): a ``StopIteration`` it raises becomes
    :func:`future_exception`'s ``RuntimeError`` (a ``concurrent.futures`` future holds
    one, but copying it into the awaiting asyncio future fails and leaves that waiting)."""
    try:
        return fn(*args, **kwargs)
    except StopIteration as exc:
        raise future_exception(exc) from exc
