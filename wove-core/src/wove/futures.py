"""Futures of runs, ``as_completed``, ``gather`` and the lazy ``map`` iterator.

* :class:`RunFuture` — what :meth:`ExecutorRuntime.submit <wove.runtime.ExecutorRuntime.submit>`
  returns: an awaitable handle on one run, with ``done()``, ``result()``, ``exception()``,
  ``cancel()``, ``add_done_callback()`` and the run's ``run_id`` and ``environment``.
* :func:`as_completed` — futures in the order they finish: ``async for fut in
  as_completed(fs)`` yields the futures themselves (the shape of Python 3.13's
  ``asyncio.as_completed``); ``for aw in as_completed(fs): await aw`` yields awaitables of
  their results (the shape of every Python's ``asyncio.as_completed``).
* :func:`gather` — ``asyncio.gather`` over runs.
* :class:`MapIterator` — what :meth:`ExecutorRuntime.map <wove.runtime.ExecutorRuntime.map>`
  returns: pulls its input lazily, keeps at most ``buffersize`` results outstanding, yields
  in input order or as completed; closing it (``break``, an exception, cancellation,
  ``aclose()``, leaving ``async with``) cancels the runs in flight.
* :class:`MapProgress` — the counts handed to ``progress=callable``.
"""

from __future__ import annotations

import asyncio
import functools
import time
import weakref
from collections import deque
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterable,
    Iterator,
)
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar, overload

__all__ = [
    "DEFAULT_MAP_BUFFERSIZE",
    "AsCompleted",
    "MapIterator",
    "MapProgress",
    "RunFuture",
    "as_completed",
    "gather",
]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

#: ``map``'s ``buffersize`` when neither the call nor the environment's
#: ``delivery_max_in_flight`` sets one.
DEFAULT_MAP_BUFFERSIZE = 256


class RunFuture(Generic[T_co]):
    """One submitted run: awaitable, with the :class:`asyncio.Future` query methods.

    Attributes:
        run_id: the run's id (``"<task_name>:<hex>"``), as in its ``run_task`` frame.
        environment: the environment the run was sent to.
        task_name: the task's name.

    ``cancel()`` asks for cancellation: the runtime sends ``cancel_task`` (by the run's
    ``delivery_cancel_mode``; with ``require_ack`` it waits, bounded, for the worker's
    confirmation) and awaiting the future then raises :class:`asyncio.CancelledError`.
    Cancelling a task that awaits the future cancels the run too.
    """

    __slots__ = ("__weakref__", "_task", "environment", "run_id", "task_name")

    def __init__(self, task: asyncio.Future[T_co], run_id: str, environment: str, task_name: str) -> None:
        self._task = task
        self.run_id = run_id
        self.environment = environment
        self.task_name = task_name

    def __await__(self) -> Generator[Any, None, T_co]:
        return self._task.__await__()

    def __repr__(self) -> str:
        if not self._task.done():
            state = "pending"
        elif self._task.cancelled():
            state = "cancelled"
        elif self._task.exception() is not None:
            state = f"failed: {type(self._task.exception()).__name__}"
        else:
            state = "finished"
        return f"<RunFuture {self.run_id} environment={self.environment!r} {state}>"

    def done(self) -> bool:
        """True once the run has a result, an exception or was cancelled."""
        return self._task.done()

    def cancelled(self) -> bool:
        """True when the run ended cancelled."""
        return self._task.cancelled()

    def cancel(self, msg: Any | None = None) -> bool:
        """Ask for the run to be cancelled; False when it has already finished."""
        return self._task.cancel(msg)

    def _check_done(self, what: str) -> None:
        if not self._task.done():
            raise asyncio.InvalidStateError(
                f"{what}() of run {self.run_id} (environment '{self.environment}'): the run has not "
                f"finished yet. Await the future (`await future`) or check done() first."
            )

    def result(self) -> T_co:
        """The run's result.

        Raises:
            asyncio.InvalidStateError: the run has not finished.
            asyncio.CancelledError: the run was cancelled.
            Exception: the task's own exception.
        """
        self._check_done("result")
        return self._task.result()

    def exception(self) -> BaseException | None:
        """The run's exception (None when it returned a value).

        Raises:
            asyncio.InvalidStateError: the run has not finished.
            asyncio.CancelledError: the run was cancelled.
        """
        self._check_done("exception")
        return self._task.exception()

    def add_done_callback(self, fn: Callable[[RunFuture[T_co]], object]) -> None:
        """Call ``fn(future)`` (on the event loop) once the run finishes."""
        self._task.add_done_callback(lambda _: fn(self))

    def get_loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the run belongs to."""
        return self._task.get_loop()


def _as_asyncio_future(awaitable: Awaitable[T]) -> asyncio.Future[T]:
    if isinstance(awaitable, RunFuture):
        return awaitable._task
    return asyncio.ensure_future(awaitable)


class AsCompleted(Generic[T]):
    """What :func:`as_completed` returns: iterate it with ``async for`` or ``for``."""

    def __init__(self, futures: Iterable[Awaitable[T]], timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._deadline = None if timeout is None else loop.time() + timeout
        self._timeout = timeout
        self._finished: deque[Any] = deque()
        self._waiter: asyncio.Future[None] | None = None
        originals: dict[asyncio.Future[Any], Any] = {}
        for awaitable in futures:
            future = _as_asyncio_future(awaitable)
            # a coroutine is represented by the task wrapping it
            originals[future] = awaitable if isinstance(awaitable, (RunFuture, asyncio.Future)) else future
        self._remaining = len(originals)
        self._originals = originals
        for future in originals:
            future.add_done_callback(self._on_done)

    def _on_done(self, future: asyncio.Future[Any]) -> None:
        self._finished.append(self._originals[future])
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _next(self) -> Any:
        if self._remaining <= 0:
            raise StopAsyncIteration
        while not self._finished:
            self._waiter = self._loop.create_future()
            remaining = None if self._deadline is None else self._deadline - self._loop.time()
            try:
                if remaining is not None and remaining <= 0:
                    raise asyncio.TimeoutError
                await asyncio.wait_for(asyncio.shield(self._waiter), remaining)
            except asyncio.TimeoutError:
                raise asyncio.TimeoutError(
                    f"as_completed: {self._remaining} of {len(self._originals)} futures did not finish "
                    f"within timeout={self._timeout:g}s (they keep running; cancel them if they should stop)."
                ) from None
            finally:
                self._waiter = None
        self._remaining -= 1
        return self._finished.popleft()

    def __aiter__(self) -> AsCompleted[T]:
        return self

    async def __anext__(self) -> Any:
        """The next future to finish (a :class:`RunFuture`, the given future, or the task
        wrapping a given coroutine), already done."""
        return await self._next()

    def __iter__(self) -> Iterator[Awaitable[T]]:
        for _ in range(self._remaining):
            yield self._result_of_next()

    async def _result_of_next(self) -> T:
        future = await self._next()
        return await future  # type: ignore[no-any-return]


def as_completed(futures: Iterable[Awaitable[T]], timeout: float | None = None) -> AsCompleted[T]:
    """Futures in the order they finish.

    ``async for future in as_completed(futures)`` yields each future (done: call
    ``result()``); ``for next_result in as_completed(futures): await next_result`` yields
    awaitables of the results in completion order, like :func:`asyncio.as_completed`.
    Accepts :class:`RunFuture`, asyncio futures and coroutines. Call it in a coroutine.

    Raises:
        asyncio.TimeoutError: ``timeout`` seconds passed (counted from the call) before
            every future finished; the unfinished ones keep running.
    """
    return AsCompleted(futures, timeout)


@overload
async def gather(*futures: Awaitable[T], return_exceptions: Literal[False] = False) -> list[T]: ...
@overload
async def gather(*futures: Awaitable[T], return_exceptions: bool) -> list[T | BaseException]: ...
async def gather(*futures: Awaitable[Any], return_exceptions: bool = False) -> list[Any]:
    """The results of ``futures``, in their order (:func:`asyncio.gather` semantics).

    With ``return_exceptions=True`` an exception takes its run's place in the list;
    otherwise the first exception is raised (the other runs go on). Cancelling the
    ``gather`` cancels every run.
    """
    return list(await asyncio.gather(*(_as_asyncio_future(f) for f in futures),
                                     return_exceptions=return_exceptions))


@dataclass(frozen=True, slots=True)
class MapProgress:
    """Counts of a ``map``, handed to ``progress=callable``.

    Attributes:
        done: runs finished with a result.
        failed: runs finished with an exception (or cancelled).
        in_flight: runs submitted and not finished.
        total: every item's count, once the input is exhausted (None until then).
        finished: True for the last call, when the map has ended (exhausted or closed).
        elapsed: seconds since the map started.
    """

    done: int
    failed: int
    in_flight: int
    total: int | None
    finished: bool
    elapsed: float


class MapIterator(AsyncIterator[T_co]):
    """The async iterator :meth:`ExecutorRuntime.map` returns.

    Also an async context manager: ``async with runtime.map(...) as results:`` closes it
    (cancelling the runs in flight) however the block is left. ``break`` out of ``async
    for`` closes it when the iterator is dropped; an exception from a run (without
    ``return_exceptions``) and cancellation of the consuming task close it at once.
    """

    def __init__(
        self,
        start: Callable[[tuple[Any, ...]], asyncio.Future[Any]],
        source: Iterator[tuple[Any, ...]] | AsyncIterator[tuple[Any, ...]],
        *,
        ordered: bool,
        return_exceptions: bool,
        buffersize: int,
        reporter: Callable[[MapProgress], object] | None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._start_run = start
        self._sync_source: Iterator[tuple[Any, ...]] | None = None
        self._async_source: AsyncIterator[tuple[Any, ...]] | None = None
        if isinstance(source, AsyncIterator):
            self._async_source = source
        else:
            self._sync_source = source
        self._ordered = ordered
        self._return_exceptions = return_exceptions
        self._buffersize = buffersize
        self._reporter = reporter
        self._queue: deque[asyncio.Future[Any]] = deque()
        self._in_flight: set[asyncio.Future[Any]] = set()
        self._outstanding = 0  # submitted, not yet yielded
        self._submitted = 0
        self._done = 0
        self._failed = 0
        self._exhausted = False
        self._closed = False
        self._source_error: BaseException | None = None
        self._reporter_error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._space: asyncio.Future[None] | None = None
        self._feeder: asyncio.Task[None] | None = None
        self._started_at = time.monotonic()
        self._ref = weakref.ref(self)

    # -- async iterator ----------------------------------------------------------------
    def __aiter__(self) -> MapIterator[T_co]:
        return self

    async def __anext__(self) -> T_co:
        try:
            while True:
                if self._closed:
                    raise StopAsyncIteration
                if self._reporter_error is not None:
                    raise self._reporter_error
                if self._sync_source is not None:
                    self._top_up()
                elif self._feeder is None:
                    assert self._async_source is not None
                    self._feeder = self._loop.create_task(self._feed(self._ref, self._async_source))
                queue = self._queue
                if queue and (not self._ordered or queue[0].done()):
                    future = queue.popleft()
                    # done, though its done callback may not have run yet: counted now (once),
                    # so the progress reported when the map ends includes it
                    self._settle(future)
                    self._outstanding -= 1
                    if self._space is not None and not self._space.done():
                        self._space.set_result(None)
                    return self._outcome(future)  # type: ignore[no-any-return]
                if self._exhausted and self._outstanding == 0:
                    self._finish()
                    if self._source_error is not None:
                        raise self._source_error
                    raise StopAsyncIteration
                self._waiter = self._loop.create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
        except StopAsyncIteration:
            raise
        except BaseException:
            await self._close()
            raise

    def _outcome(self, future: asyncio.Future[Any]) -> Any:
        if future.cancelled():
            if self._return_exceptions:
                return asyncio.CancelledError(f"a run of this map was cancelled ({future!r})")
            return future.result()  # raises CancelledError (then the map closes)
        error = future.exception()
        if error is None:
            return future.result()
        if self._return_exceptions:
            return error
        raise error

    # -- feeding -----------------------------------------------------------------------
    def _start(self, item: tuple[Any, ...]) -> None:
        try:
            future = self._start_run(item)
        except Exception as exc:  # the call could not even be submitted: its place holds the error
            future = self._loop.create_future()
            future.set_exception(exc)
        self._submitted += 1
        self._outstanding += 1
        self._in_flight.add(future)
        if self._ordered:
            self._queue.append(future)
        # by weak reference: a map dropped by its consumer (``break``) is collected and its
        # __del__ cancels the runs in flight, which must not keep it alive
        future.add_done_callback(functools.partial(_map_run_done, self._ref))

    def _top_up(self) -> None:
        source = self._sync_source
        assert source is not None
        while not self._exhausted and self._outstanding < self._buffersize:
            try:
                item = next(source)
            except StopIteration:
                self._exhausted = True
                self._report()
            except Exception as exc:
                self._source_error = exc
                self._exhausted = True
            else:
                self._start(item)

    @staticmethod
    async def _feed(ref: weakref.ReferenceType[MapIterator[Any]], source: AsyncIterator[tuple[Any, ...]]) -> None:
        """Pull the async input as slots free up (holding the map only by weak reference
        while it waits, so a dropped map can be collected)."""
        error: Exception | None = None
        while True:
            self = ref()
            if self is None or self._closed:
                return
            if self._outstanding >= self._buffersize:
                space = self._space = self._loop.create_future()
                del self
                await space
                continue
            del self
            try:
                item = await source.__anext__()
            except StopAsyncIteration:
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = exc
                break
            self = ref()
            if self is None or self._closed:
                return
            self._start(item)
            self._wake()
            del self
        self = ref()
        if self is None:
            return
        self._source_error = error
        self._exhausted = True
        self._report()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _settle(self, future: asyncio.Future[Any]) -> bool:
        """Count a finished run once: from its done callback, or when the consumer takes it
        first. False when it was counted already."""
        if future not in self._in_flight:
            return False
        self._in_flight.discard(future)
        if future.cancelled() or future.exception() is not None:
            self._failed += 1
        else:
            self._done += 1
        return True

    def _on_done(self, future: asyncio.Future[Any]) -> None:
        if self._closed:
            self._in_flight.discard(future)
            return
        if not self._settle(future):
            return  # taken by the consumer before this callback ran
        if not self._ordered:
            self._queue.append(future)
            self._wake()
        elif self._queue and self._queue[0] is future:
            self._wake()
        self._report()

    # -- progress ----------------------------------------------------------------------
    def progress(self, *, finished: bool = False) -> MapProgress:
        """The counts so far."""
        return MapProgress(
            done=self._done,
            failed=self._failed,
            in_flight=len(self._in_flight),
            total=self._submitted if self._exhausted else None,
            finished=finished,
            elapsed=time.monotonic() - self._started_at,
        )

    def _report(self, *, finished: bool = False) -> None:
        if self._reporter is None:
            return
        try:
            self._reporter(self.progress(finished=finished))
        except Exception as exc:  # raised to the consumer at its next step
            if self._reporter_error is None:
                self._reporter_error = exc

    def _finish(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._reporter is not None:
            self._reporter(self.progress(finished=True))

    # -- closing -----------------------------------------------------------------------
    def _cancel_all(self) -> list[asyncio.Future[Any]]:
        pending = list(self._in_flight)
        if self._feeder is not None and not self._feeder.done():
            pending.append(self._feeder)
        for future in pending:
            future.cancel()
        return pending

    async def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        pending = self._cancel_all()
        try:
            if pending:  # let each run send its cancel_task
                await asyncio.gather(*pending, return_exceptions=True)
        finally:
            self._queue.clear()
            if self._reporter is not None:
                try:
                    self._reporter(self.progress(finished=True))
                except Exception:
                    pass

    async def aclose(self) -> None:
        """Stop: cancel the runs in flight (each sends its ``cancel_task``) and wait for them."""
        await self._close()

    async def __aenter__(self) -> MapIterator[T_co]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._close()

    def __del__(self) -> None:
        if self._closed or not (self._in_flight or self._feeder):
            return
        self._closed = True
        try:
            if not self._loop.is_closed():
                self._cancel_all()
            if self._reporter is not None:
                self._reporter(self.progress(finished=True))
        except Exception:
            pass


def _map_run_done(ref: weakref.ReferenceType[MapIterator[Any]], future: asyncio.Future[Any]) -> None:
    iterator = ref()
    if iterator is not None:
        iterator._on_done(future)
    elif not future.cancelled():
        future.exception()  # retrieved: a dropped map's runs log no "exception never retrieved"


async def _zip_async(iterables: tuple[Iterable[Any] | AsyncIterable[Any], ...]) -> AsyncIterator[tuple[Any, ...]]:
    iterators: list[Any] = [
        aiter(it) if isinstance(it, AsyncIterable) else iter(it) for it in iterables
    ]
    while True:
        row = []
        for iterator in iterators:
            try:
                if isinstance(iterator, AsyncIterator):
                    row.append(await iterator.__anext__())
                else:
                    row.append(next(iterator))
            except (StopIteration, StopAsyncIteration):
                return
        yield tuple(row)


async def _tuples_async(iterable: AsyncIterable[Any]) -> AsyncIterator[tuple[Any, ...]]:
    async for item in iterable:
        yield tuple(item)


def map_source(iterables: tuple[Iterable[Any] | AsyncIterable[Any], ...], *, star: bool
               ) -> Iterator[tuple[Any, ...]] | AsyncIterator[tuple[Any, ...]]:
    """The argument tuples of a ``map`` (``star``: of a ``starmap``), sync when every input is."""
    if star:
        (iterable,) = iterables
        if isinstance(iterable, AsyncIterable):
            return _tuples_async(iterable)
        return (tuple(item) for item in iterable)
    if any(isinstance(it, AsyncIterable) for it in iterables):
        return _zip_async(iterables)
    return zip(*iterables)  # type: ignore[arg-type]
