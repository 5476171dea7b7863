"""Streamed results: the caller's side of ``runtime.stream`` (see docs/calling.md, "Streamed results").

A streamed run is one ``run_task`` whose ``delivery`` carries ``delivery_stream_window``
(the items the worker may produce before the consumer took any). The worker answers with
``task_yield`` events (``item``, ``seq``) and then the one terminal event; :class:`RunStream`
hands the items to ``async for`` as they arrive and, as the consumer takes them, gives the
worker more credit with ``stream_credit`` commands, so the worker never runs more than the
window ahead. Leaving the loop early (``break``, an exception, cancellation), ``aclose()``
or leaving ``async with`` sends ``cancel_task``: the worker closes the generator, so its
``finally`` blocks run.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from . import observe
from ._gate import Gate
from .delivery import Delivery, Run
from .errors import DeliveryTimeoutError, StreamNotSupportedError
from .observe import _OBSERVERS, RunInfo
from .protocol import CAPABILITY_TASK_YIELD

if TYPE_CHECKING:
    from types import TracebackType

    from .runtime import ExecutorRuntime, _Environment

__all__ = ["DEFAULT_STREAM_WINDOW", "RunStream", "stream_not_supported"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Items a worker may produce ahead of the consumer when the environment sets no
#: ``delivery_stream_window``.
DEFAULT_STREAM_WINDOW = 16

#: cancel tasks of streams dropped without being closed (kept alive until they finish)
_ABANDONED: set[asyncio.Task[Any]] = set()


def stream_not_supported(task: str, environment: str, executor: Any,
                         capabilities: frozenset[str]) -> StreamNotSupportedError:
    """The error of ``runtime.stream`` on an executor whose worker did not announce ``task_yield``."""
    return StreamNotSupportedError(
        f"runtime.stream() of task '{task}' in environment '{environment}': the worker of its "
        f"{type(executor).__name__} does not support streamed results (it did not announce the "
        f"'{CAPABILITY_TASK_YIELD}' capability; announced: {', '.join(sorted(capabilities)) or 'none'}). A Wove 2.x "
        "worker does not; upgrade the worker to Wove 3 (wove-core and the wove-executor-* package it "
        "runs; for gRPC, a service that offers the Session method), or use runtime.call() with a task that "
        "returns a list."
    )


class StreamState:
    """The items of one streamed run that arrived and were not taken yet (the runtime's
    receiver pushes, :class:`RunStream` pops)."""

    __slots__ = ("items", "next_seq", "wake")

    def __init__(self) -> None:
        self.items: deque[Any] = deque()
        self.next_seq = 0
        self.wake = asyncio.Event()

    def push(self, seq: Any, item: Any) -> None:
        if isinstance(seq, int) and seq < self.next_seq:
            return  # the same item again (a run delivered twice): keep the first
        self.items.append(item)
        self.next_seq = seq + 1 if isinstance(seq, int) else self.next_seq + 1
        self.wake.set()


class _Handle:
    """What a stream needs to end its run; kept apart from :class:`RunStream` so a dropped
    stream can be collected and still cancel its run."""

    __slots__ = ("closed", "env", "limit", "observed", "run", "runtime", "state")

    def __init__(self, runtime: ExecutorRuntime, env: _Environment) -> None:
        self.runtime = runtime
        self.env = env
        self.run: Run | None = None
        self.state = StreamState()
        self.limit: Gate | None = None
        self.closed = False
        #: what observers see of the run (wove.observe), while it is open
        self.observed: RunInfo | None = None

    def release(self) -> None:
        """Forget the run (idempotent)."""
        self.closed = True
        run = self.run
        if run is not None:
            run.clear_timer()
            self.env.pending.pop(run.run_id, None)
            self.env.streams.pop(run.run_id, None)
        if self.limit is not None:
            self.limit.release()
            self.limit = None
        observed, self.observed = self.observed, None
        if observed is not None:
            future = run.future if run is not None else None
            if future is not None and future.done() and not future.cancelled():
                error = future.exception()
            else:  # cancelled by the worker, or the consumer stopped early
                error = asyncio.CancelledError(f"Streamed run {observed.run_id} was cancelled.")
            observe._finished(observed, error)

    async def cancel(self) -> None:
        """The consumer stopped early: tell the worker (it closes the generator)."""
        run = self.run
        if self.closed or run is None:
            self.release()
            return
        if run.future.done():
            self.release()
            return
        run.settled = True
        self.closed = True
        try:  # still pending meanwhile: a require_ack cancel sees its task_cancelled
            await self.runtime._send_cancel(self.env, run)
        finally:
            self.release()

    def abandon(self) -> None:
        """Schedule :meth:`cancel` from a finalizer (any thread)."""
        if self.closed or self.run is None:
            return
        loop = self.run.future.get_loop()
        if loop.is_closed():
            return

        def schedule() -> None:
            task = loop.create_task(self.cancel())
            _ABANDONED.add(task)
            task.add_done_callback(_ABANDONED.discard)

        try:
            loop.call_soon_threadsafe(schedule)
        except RuntimeError:  # the loop closed meanwhile
            pass


class RunStream(AsyncIterator[T], Generic[T]):
    """The items of one streamed run, as they are produced (``runtime.stream(...)``).

    Use ``async for item in stream`` (optionally inside ``async with stream:``, which
    cancels the run deterministically when the block is left). The run starts on the first
    ``__anext__``. After the last item the loop ends; the task's error is raised at the
    item where it happened.

    Attributes:
        run_id: the run's id.
        environment: the environment it runs in.
        window: items the worker may produce ahead of the consumer.
    """

    def __init__(self, runtime: ExecutorRuntime, env: _Environment, task_name: str, func: Any,
                 args: dict[str, Any], delivery: Delivery, run_id: str, window: int) -> None:
        self.run_id = run_id
        self.environment = env.name
        self.window = window
        self._task_name = task_name
        self._func: Any = func
        self._args: dict[str, Any] | None = args
        self._delivery = delivery
        self._handle = _Handle(runtime, env)
        self._started = False
        self._done = False
        self._ungranted = 0
        self._batch = max(1, window // 2)

    def __aiter__(self) -> RunStream[T]:
        return self

    async def __aenter__(self) -> RunStream[T]:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the run if it is still going (``cancel_task``; the worker closes the generator)."""
        self._done = True
        await self._handle.cancel()

    def __del__(self) -> None:
        handle = getattr(self, "_handle", None)
        if handle is not None:
            handle.abandon()

    async def start(self) -> None:
        """Start the run now (the first ``__anext__`` does it otherwise).

        Raises:
            StreamNotSupportedError: the executor learned (its first exchange with the
                worker) that the worker does not stream results; nothing was sent.
        """
        if self._started:
            return
        self._started = True
        handle = self._handle
        env = handle.env
        executor = env.executor
        if CAPABILITY_TASK_YIELD not in executor.capabilities:
            capabilities = await executor.negotiate_capabilities()
            if CAPABILITY_TASK_YIELD not in capabilities:
                self._done = True
                raise stream_not_supported(self._task_name, env.name, executor, capabilities)
        delivery = self._delivery
        if delivery.max_in_flight is not None:
            limit = env.limits.get(delivery.max_in_flight)
            if limit is None:
                limit = env.limits[delivery.max_in_flight] = Gate(delivery.max_in_flight)
            if not limit.try_acquire():
                await limit.acquire()
            handle.limit = limit
        loop = asyncio.get_running_loop()
        run = Run.start(loop, self.run_id, self._task_name, env.name, delivery)
        handle.run = run
        env.pending[self.run_id] = run
        env.streams[self.run_id] = handle.state
        wake = handle.state.wake
        run.future.add_done_callback(lambda _f: wake.set())
        fields = delivery.fields()
        fields["delivery_stream_window"] = self.window
        frame = {
            "type": "run_task",
            "run_id": self.run_id,
            "task_id": self._task_name,
            "callable": self._func,
            "args": self._args,
            "delivery": fields,
        }
        if _OBSERVERS:
            handle.observed = RunInfo(self.run_id, self._task_name, env.name, env.label, type(executor),
                                      streamed=True)
            observe._submitted(handle.observed)
            observe._frame_fields(handle.observed, frame)
        try:
            await env.executor.send(frame)
            if handle.observed is not None:
                observe._call("run_sent", handle.observed)
        except BaseException as exc:
            self._done = True
            observed, handle.observed = handle.observed, None
            if observed is not None:  # not sent: it ends with this error
                observe._finished(observed, exc)
            handle.release()
            raise
        finally:
            self._func = self._args = None

    async def __anext__(self) -> T:
        if self._done:
            raise StopAsyncIteration
        if not self._started:
            await self.start()
        handle = self._handle
        state = handle.state
        run = handle.run
        assert run is not None
        try:
            while True:
                if state.items:
                    item = state.items.popleft()
                    await self._took()
                    return item  # type: ignore[no-any-return]
                if run.future.done():
                    await self._finish(run)
                state.wake.clear()
                if not state.items and not run.future.done():
                    await state.wake.wait()
        except asyncio.CancelledError:
            if not self._done:  # the consumer was cancelled while waiting: end the run
                self._done = True
                handle.abandon()
            raise

    async def _took(self) -> None:
        """The consumer took an item: grant the worker more credit, in batches."""
        self._ungranted += 1
        run = self._handle.run
        if self._ungranted < self._batch or run is None or run.future.done():
            return
        credit, self._ungranted = self._ungranted, 0
        try:
            await self._handle.env.executor.send({"type": "stream_credit", "run_id": run.run_id,
                                                  "task_id": run.task_id, "credit": credit})
        except Exception as exc:  # a lost transport ends the run through recv(); say why here only
            logger.debug("environment=%s run_id=%s: stream_credit not delivered: %r", run.environment,
                         run.run_id, exc)

    async def _finish(self, run: Run) -> None:
        """The terminal event arrived (or the runtime ended the run) and every item before
        it was taken: end the iteration the way the run ended."""
        self._done = True
        handle = self._handle
        future = run.future
        try:
            if future.cancelled():
                raise asyncio.CancelledError(f"Streamed run {run.run_id} of task '{run.task_id}' was cancelled.")
            error = future.exception()
            if error is None:
                raise StopAsyncIteration
            if isinstance(error, DeliveryTimeoutError):
                confirmed = await handle.runtime._send_cancel(handle.env, run)
                raise DeliveryTimeoutError(f"{error} {confirmed}") from None
            payload = getattr(error, "payload", None)
            if isinstance(payload, dict) and payload.get("source") == "executor":
                # an item that could not be sent or decoded: the worker's generator may be waiting still
                try:
                    await handle.env.executor.send(run.cancel_frame())
                except Exception as exc:
                    logger.debug("environment=%s run_id=%s: cancel_task not delivered: %r", run.environment,
                                 run.run_id, exc)
            raise error
        finally:
            handle.release()
