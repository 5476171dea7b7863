"""``Client``: the runtime for synchronous code, on a background event-loop thread.

::

    from wove.environment import Client

    with Client({"workers": {"executor": "stdio"}}) as client:
        print(client.call("workers", pow, 2, 10))                  # 1024
        future = client.submit("workers", sum, [1, 2, 3])          # concurrent.futures.Future
        for square in client.map("workers", pow, range(10), [2] * 10):
            print(square)
        with client.executor("workers") as pool:                   # a concurrent.futures.Executor
            print(list(pool.map(abs, [-1, -2])))

The runtime (:class:`~wove.runtime.ExecutorRuntime`) lives on an event loop that runs in
a daemon thread (``wove-client``): blocking calls wait for it, so the interpreter can
always exit. Ctrl-C while a call or a ``map`` waits cancels its runs in flight (each
sends its ``cancel_task``) and raises :class:`KeyboardInterrupt`; leaving the ``with``
block stops the runtime (pending runs end by their orphan policy) and the thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Iterator
from typing import Any, Generic, Literal, ParamSpec, TypeVar, overload

from .futures import MapIterator, MapProgress, RunFuture
from .runtime import ExecutorRuntime

__all__ = ["Client", "ClientExecutor"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")
A1 = TypeVar("A1")
A2 = TypeVar("A2")

#: seconds a cancelled call (Ctrl-C) may take to send its cancel_task before KeyboardInterrupt
CANCEL_GRACE = 10.0
_Progress = bool | Callable[[MapProgress], object]


class Client:
    """The runtime for synchronous code (see the module docstring).

    Args:
        environment_definitions: environment name → definition, as for
            :class:`~wove.runtime.ExecutorRuntime`.
        run_config: run-wide settings, as for :class:`~wove.runtime.ExecutorRuntime`.
        stop_timeout: seconds leaving the ``with`` block waits for the runtime to stop.

    Use it as a context manager (or call :meth:`start` and :meth:`close`).
    """

    def __init__(
        self,
        environment_definitions: dict[str, dict[str, Any]] | None = None,
        run_config: dict[str, Any] | None = None,
        *,
        stop_timeout: float = 30.0,
    ) -> None:
        self._definitions = dict(environment_definitions or {})
        self._run_config = dict(run_config or {})
        self._stop_timeout = stop_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runtime: ExecutorRuntime | None = None

    # -- lifecycle -------------------------------------------------------------------
    def __enter__(self) -> Client:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        """Start the loop thread and the runtime (every defined environment).

        Raises:
            Exception: whatever starting an environment raised (the thread is stopped).
            KeyboardInterrupt: Ctrl-C while environments start.
        """
        if self._loop is not None:
            return
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        thread = threading.Thread(target=self._run_loop, args=(loop, ready), name="wove-client", daemon=True)
        thread.start()
        ready.wait()
        self._loop, self._thread = loop, thread
        self._runtime = ExecutorRuntime(self._definitions, self._run_config)
        try:
            self._wait(self._spawn(self._runtime.start))
        except KeyboardInterrupt:
            self.close()
            raise KeyboardInterrupt from None
        except BaseException:
            self._shutdown_loop()
            raise

    def close(self) -> None:
        """Stop the runtime (pending runs end by their orphan policy) and the loop thread."""
        if self._loop is None or self._runtime is None:
            return
        runtime, self._runtime = self._runtime, None
        try:
            stopping = asyncio.run_coroutine_threadsafe(runtime.stop(), self._loop)
            try:
                stopping.result(self._stop_timeout)
            except (concurrent.futures.TimeoutError, KeyboardInterrupt):
                stopping.cancel()
            except Exception:
                pass  # stop() logs what failed; leaving the block must not raise over the body's error
        finally:
            self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        self._runtime = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(self._stop_timeout)

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
            leftovers = asyncio.all_tasks(loop)
            for task in leftovers:
                task.cancel()
            if leftovers:
                loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    # -- plumbing --------------------------------------------------------------------
    def _started(self) -> tuple[asyncio.AbstractEventLoop, ExecutorRuntime]:
        if self._loop is None or self._runtime is None:
            raise RuntimeError("The Client is not running: use it as `with Client(...) as client:` "
                               "(or call client.start() first).")
        return self._loop, self._runtime

    def _spawn(self, start: Callable[[], Awaitable[T]]) -> _Call[T]:
        """Run ``start()`` (returning an awaitable, e.g. a RunFuture) on the loop."""
        loop, _ = self._loop, self._runtime
        assert loop is not None
        call: _Call[T] = _Call(loop)
        loop.call_soon_threadsafe(call.begin, start)
        return call

    @staticmethod
    def _wait(call: _Call[T]) -> T:
        try:
            return call.future.result()
        except KeyboardInterrupt:
            call.cancel_and_wait(CANCEL_GRACE)
            raise

    def _check_environment(self, environment: str) -> None:
        if environment not in self._definitions:
            known = ", ".join(sorted(self._definitions)) or "(none)"
            raise NameError(f"Client: unknown environment '{environment}'. Known environments: {known}.")

    # -- calling ---------------------------------------------------------------------
    @overload
    def submit(self, environment: str, func: Callable[P, Coroutine[Any, Any, R]], /,
               *args: P.args, **kwargs: P.kwargs) -> concurrent.futures.Future[R]: ...
    @overload
    def submit(self, environment: str, func: Callable[P, R], /,
               *args: P.args, **kwargs: P.kwargs) -> concurrent.futures.Future[R]: ...
    def submit(self, environment: str, func: Callable[..., Any], /, *args: Any,
               **kwargs: Any) -> concurrent.futures.Future[Any]:
        """Start ``func(*args, **kwargs)`` in ``environment``; return a :class:`concurrent.futures.Future`.

        ``future.cancel()`` cancels the run (with its ``cancel_task``) while it has not
        finished.

        Raises:
            NameError: unknown environment.
            RuntimeError: the client is not running.
        """
        _, runtime = self._started()
        self._check_environment(environment)
        return self._spawn(lambda: runtime.submit(environment, func, *args, **kwargs)).future

    @overload
    def call(self, environment: str, func: Callable[P, Coroutine[Any, Any, R]], /,
             *args: P.args, **kwargs: P.kwargs) -> R: ...
    @overload
    def call(self, environment: str, func: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R: ...
    def call(self, environment: str, func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Run ``func(*args, **kwargs)`` in ``environment`` and return its result (blocking).

        Raises:
            KeyboardInterrupt: Ctrl-C while waiting (the run is cancelled first).
            Exception: the task's own exception, and whatever :meth:`ExecutorRuntime.call` raises.
        """
        _, runtime = self._started()
        self._check_environment(environment)
        try:
            return self._wait(self._spawn(lambda: runtime.submit(environment, func, *args, **kwargs)))
        except KeyboardInterrupt:
            raise KeyboardInterrupt from None  # a traceback of the caller's line, not of wove's waiting

    def call_with(self, environment: str, func: Callable[..., Any], args: tuple[Any, ...] = (),
                  kwargs: dict[str, Any] | None = None, **settings: Any) -> Any:
        """:meth:`ExecutorRuntime.call_with` (delivery settings per call), blocking."""
        _, runtime = self._started()
        self._check_environment(environment)
        try:
            return self._wait(self._spawn(lambda: runtime.submit_with(environment, func, args, kwargs, **settings)))
        except KeyboardInterrupt:
            raise KeyboardInterrupt from None

    @overload
    def map(self, environment: str, func: Callable[[A1], Coroutine[Any, Any, R]], iterable: Iterable[A1], /, *,
            ordered: bool = ..., return_exceptions: Literal[False] = ..., buffersize: int | None = ...,
            progress: _Progress = ...) -> Iterator[R]: ...
    @overload
    def map(self, environment: str, func: Callable[[A1], R], iterable: Iterable[A1], /, *,
            ordered: bool = ..., return_exceptions: Literal[False] = ..., buffersize: int | None = ...,
            progress: _Progress = ...) -> Iterator[R]: ...
    @overload
    def map(self, environment: str, func: Callable[[A1, A2], Coroutine[Any, Any, R]], iterable: Iterable[A1],
            iterable2: Iterable[A2], /, *, ordered: bool = ..., return_exceptions: Literal[False] = ...,
            buffersize: int | None = ..., progress: _Progress = ...) -> Iterator[R]: ...
    @overload
    def map(self, environment: str, func: Callable[[A1, A2], R], iterable: Iterable[A1], iterable2: Iterable[A2],
            /, *, ordered: bool = ..., return_exceptions: Literal[False] = ..., buffersize: int | None = ...,
            progress: _Progress = ...) -> Iterator[R]: ...
    @overload
    def map(self, environment: str, func: Callable[[A1], Any], iterable: Iterable[A1], /, *,
            ordered: bool = ..., return_exceptions: Literal[True], buffersize: int | None = ...,
            progress: _Progress = ...) -> Iterator[Any]: ...
    @overload
    def map(self, environment: str, func: Callable[[A1, A2], Any], iterable: Iterable[A1], iterable2: Iterable[A2],
            /, *, ordered: bool = ..., return_exceptions: Literal[True], buffersize: int | None = ...,
            progress: _Progress = ...) -> Iterator[Any]: ...
    @overload
    def map(self, environment: str, func: Callable[..., Any], iterable: Iterable[Any], iterable2: Iterable[Any],
            iterable3: Iterable[Any], /, *iterables: Iterable[Any], ordered: bool = ..., return_exceptions: bool = ...,
            buffersize: int | None = ..., progress: _Progress = ...) -> Iterator[Any]: ...
    def map(self, environment: str, func: Callable[..., Any], /, *iterables: Iterable[Any], ordered: bool = True,
            return_exceptions: bool = False, buffersize: int | None = None,
            progress: _Progress = False) -> Iterator[Any]:
        """:meth:`ExecutorRuntime.map` as a plain iterator (same arguments and semantics).

        The input iterables are read on the client's loop thread. Closing the iterator
        (``break`` and dropping it, ``close()``, Ctrl-C while it waits, an exception from
        a run) cancels the runs in flight.
        """
        _, runtime = self._started()
        self._check_environment(environment)
        if not iterables:
            raise TypeError("map() needs at least one iterable of arguments after the function.")
        return _SyncMap(self, lambda: runtime.map(
            environment, func, *iterables, ordered=ordered, return_exceptions=return_exceptions,
            buffersize=buffersize, progress=progress), buffersize or 256)

    def starmap(self, environment: str, func: Callable[..., R], iterable: Iterable[Iterable[Any]], /, *,
                ordered: bool = True, return_exceptions: bool = False, buffersize: int | None = None,
                progress: _Progress = False) -> Iterator[R]:
        """:meth:`ExecutorRuntime.starmap` as a plain iterator."""
        _, runtime = self._started()
        self._check_environment(environment)
        return _SyncMap(self, lambda: runtime.starmap(
            environment, func, iterable, ordered=ordered, return_exceptions=return_exceptions,
            buffersize=buffersize, progress=progress), buffersize or 256)

    @overload
    def stream(self, environment: str, func: Callable[P, AsyncIterator[R]], /,
               *args: P.args, **kwargs: P.kwargs) -> Iterator[R]: ...
    @overload
    def stream(self, environment: str, func: Callable[P, Iterator[R]], /,
               *args: P.args, **kwargs: P.kwargs) -> Iterator[R]: ...
    def stream(self, environment: str, func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Iterator[Any]:
        """:meth:`ExecutorRuntime.stream` as a plain iterator: a generator task's items as
        the worker produces them. Closing the iterator (``break`` and dropping it,
        ``close()``, Ctrl-C while it waits) cancels the run; the worker closes the generator.

        Raises:
            StreamNotSupportedError: the worker does not stream results (at the call, or
                at the first ``next()`` for an executor that learns it on first contact).
        """
        loop, runtime = self._started()
        self._check_environment(environment)

        async def create() -> Any:
            return runtime.stream(environment, func, *args, **kwargs)

        stream = asyncio.run_coroutine_threadsafe(create(), loop).result()
        return _SyncMap(self, lambda: stream, 1)

    def executor(self, environment: str) -> ClientExecutor:
        """A :class:`concurrent.futures.Executor` whose ``submit`` runs in ``environment``."""
        self._started()
        self._check_environment(environment)
        return ClientExecutor(self, environment)


class _Call(Generic[T]):
    """A call handed to the loop: its concurrent future, the loop-side future once begun."""

    __slots__ = ("finished", "future", "loop", "running")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self.running: asyncio.Future[Any] | None = None
        #: set once the loop-side run has ended (or never began)
        self.finished = threading.Event()
        self.future.add_done_callback(self._on_future_done)

    def begin(self, start: Callable[[], Awaitable[Any]]) -> None:
        """On the loop: start the run and chain its outcome to ``future``."""
        if self.future.cancelled():
            self.finished.set()
            self._notify_cancelled()
            return
        try:
            awaitable = start()
            running = awaitable._task if isinstance(awaitable, RunFuture) else asyncio.ensure_future(awaitable)
        except BaseException as exc:
            self.finished.set()
            if self.future.set_running_or_notify_cancel():
                self.future.set_exception(exc)
            return
        self.running = running
        running.add_done_callback(self._on_running_done)

    def _on_running_done(self, running: asyncio.Future[Any]) -> None:
        self.finished.set()
        if running.cancelled():
            self.future.cancel()
            self._notify_cancelled()
            return
        if not self.future.set_running_or_notify_cancel():
            return  # the caller cancelled it
        if running.exception() is not None:
            self.future.set_exception(running.exception())
        else:
            self.future.set_result(running.result())

    def _notify_cancelled(self) -> None:
        """Move a cancelled future on to CANCELLED_AND_NOTIFIED, as executors do, so that
        ``concurrent.futures.wait`` and ``as_completed`` count it as done."""
        try:
            self.future.set_running_or_notify_cancel()
        except RuntimeError:  # notified already
            pass

    def _on_future_done(self, future: concurrent.futures.Future[Any]) -> None:
        if future.cancelled():
            try:
                self.loop.call_soon_threadsafe(self._cancel_running)
            except RuntimeError:  # the loop is closed
                self.finished.set()

    def _cancel_running(self) -> None:
        if self.running is not None:
            self.running.cancel()
        else:
            self.finished.set()

    def cancel_and_wait(self, timeout: float) -> None:
        """Cancel (Ctrl-C) and give the run ``timeout`` seconds to send its cancel_task."""
        self.future.cancel()
        try:
            self.finished.wait(timeout)
        except KeyboardInterrupt:  # a second Ctrl-C: stop waiting
            pass


class _Channel:
    """The buffer between a map's pump (loop thread) and its consumer (caller's thread)."""

    __slots__ = ("capacity", "condition", "items", "paused", "space")

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self.items: deque[tuple[bool, Any]] = deque()
        self.condition = threading.Condition()
        self.paused = False
        self.space: asyncio.Event | None = None


_END = object()


async def _pump(channel: _Channel, make: Callable[[], MapIterator[Any]]) -> None:
    """Move a runtime map's items into ``channel`` (holding no reference to the consumer's
    iterator, so dropping that iterator collects it and cancels this pump)."""
    channel.space = space = asyncio.Event()
    results = make()
    try:
        async for item in results:
            with channel.condition:
                channel.items.append((True, item))
                full = len(channel.items) >= channel.capacity
                if full:
                    channel.paused = True
                    space.clear()
                channel.condition.notify()
            if full:
                await space.wait()
    except BaseException as exc:
        with channel.condition:
            channel.items.append((False, exc))
            channel.condition.notify()
        if not isinstance(exc, Exception):
            raise
    else:
        with channel.condition:
            channel.items.append((True, _END))
            channel.condition.notify()
    finally:
        await results.aclose()


class _SyncMap(Iterator[T]):
    """A runtime ``map`` consumed from another thread through a bounded buffer."""

    def __init__(self, client: Client, make: Callable[[], MapIterator[T]], capacity: int) -> None:
        self._loop = client._loop
        assert self._loop is not None
        self._channel = channel = _Channel(capacity)
        self._done = False
        self._call: _Call[None] = client._spawn(lambda: _pump(channel, make))

    def __iter__(self) -> _SyncMap[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        channel = self._channel
        try:
            with channel.condition:
                while not channel.items:
                    channel.condition.wait()
                ok, value = channel.items.popleft()
                resume = channel.paused and len(channel.items) < channel.capacity
                if resume:
                    channel.paused = False
        except KeyboardInterrupt:
            self.close()
            raise KeyboardInterrupt from None
        if resume and channel.space is not None:
            self._loop.call_soon_threadsafe(channel.space.set)  # type: ignore[union-attr]
        if value is _END:
            self._done = True
            raise StopIteration
        if not ok:
            self._done = True
            if isinstance(value, asyncio.CancelledError):
                raise concurrent.futures.CancelledError(str(value)) from None
            raise value
        return value  # type: ignore[no-any-return]

    def close(self) -> None:
        """Stop: cancel the runs in flight and wait (bounded) for their cancel_task."""
        if self._done:
            return
        self._done = True
        self._call.cancel_and_wait(CANCEL_GRACE)

    def __del__(self) -> None:
        if not self._done:
            self._done = True
            self._call.future.cancel()


class ClientExecutor(concurrent.futures.Executor):
    """A :class:`concurrent.futures.Executor` over one environment of a :class:`Client`.

    ``submit``, ``map``, ``shutdown`` and the context manager behave as the standard
    library documents, so ``loop.run_in_executor(executor, fn, *args)``,
    ``concurrent.futures.as_completed`` and libraries that take an Executor work
    unchanged. ``shutdown()`` ends this executor's use, not the client's runtime.
    """

    def __init__(self, client: Client, environment: str) -> None:
        self._client = client
        self._environment = environment
        self._lock = threading.Lock()
        self._futures: set[concurrent.futures.Future[Any]] = set()
        self._shutdown = False

    @property
    def environment(self) -> str:
        return self._environment

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> concurrent.futures.Future[T]:
        with self._lock:
            if self._shutdown:
                raise RuntimeError(f"cannot schedule new futures after shutdown (executor of environment "
                                   f"'{self._environment}')")
            future = self._client.submit(self._environment, fn, *args, **kwargs)
            self._futures.add(future)
        future.add_done_callback(self._forget)
        return future

    def _forget(self, future: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._futures.discard(future)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            pending = list(self._futures)
        if cancel_futures:
            for future in pending:
                future.cancel()
        if wait:
            concurrent.futures.wait(pending)
