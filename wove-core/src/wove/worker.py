"""The transport-agnostic worker engine: command frames in, event frames out.

Every worker service (the stdio worker, the HTTP, gRPC and WebSocket services) and the
in-process executor wrap one :class:`WorkerEngine`. A transport decodes (and verifies)
a command, then calls :meth:`WorkerEngine.submit` with a *sink*: a plain function that
receives the events of that run and must not block (it encodes and queues or writes).

Semantics:

* ``run_task`` → ``task_started``, ``heartbeat`` every third of the run's
  ``delivery_heartbeat_seconds`` (from a loop timer, independent of the task body), then
  exactly one terminal event (``task_result``, ``task_error`` or ``task_cancelled``).
* Async callables run on the loop; sync callables in a bounded thread pool.
* At most ``max_concurrency`` runs execute at once and at most ``max_queued`` more wait;
  :meth:`submit` awaits beyond that, which pushes back on the transport's reader.
* ``cancel_task`` cancels by ``run_id`` and reports ``task_cancelled``; an unknown run is
  ignored.
* Runs sharing a ``delivery_idempotency_key`` (or re-sent with the same ``run_id``) attach
  to the running execution; a duplicate of a recently finished run gets the same terminal
  event without running again. Finished results are kept in a cache bounded three ways:
  entries (``idempotency_cache_size``), time (``idempotency_ttl``; a large result, at least
  ``large_result_bytes`` by a cheap size estimate, only for ``large_result_ttl``: long enough
  for a client to re-deliver after a lost connection) and bytes (``idempotency_cache_bytes``,
  oldest first; a result larger than the whole bound is not kept). Expired entries are
  swept on a timer, not only when asked for.
* Sync callables run on daemon threads that never keep the process from exiting: a sync
  call that timed out or was cancelled cannot be interrupted, so it is abandoned, not
  waited for.
* ``shutdown`` stops accepting work and ends runs by orphan policy: ``cancel`` →
  ``task_cancelled``; ``fail`` → ``task_error``; ``requeue`` → cancelled silently so the
  submitter re-delivers it; ``detach`` → allowed to finish within the grace period.
* A run whose ``delivery`` has ``delivery_capture_output: true`` (the runtime sets it
  unless the environment says ``capture_output: false``) has its ``print()`` and
  ``logging`` output captured (per run, with a context variable: concurrent runs do not
  mix) and sent as ``log`` events carrying the ``run_id`` and ``task_id`` and either
  ``stream`` (``stdout``/``stderr``) text in whole lines or a ``record`` (``name``,
  ``levelno``, ``levelname``, ``msg``), before its terminal event. See :mod:`wove._capture`.
* A run whose ``delivery`` has ``delivery_stream_window: N`` (``runtime.stream``) is a
  streamed run: the callable returns a generator or async generator, and each item it
  yields goes out as a ``task_yield`` event (``item``, ``seq`` from 0) before the one
  terminal event (``task_result`` with result None, or the ``task_error`` raised at the
  item where it happened). The engine pulls an item only with credit: ``N`` to start with,
  plus what ``stream_credit`` commands (:meth:`WorkerEngine.grant`) add, so it never runs
  more than the window ahead of the consumer; a sync generator's items are pulled in the
  thread pool. Cancelling the run closes the generator (``aclose()``/``close()``: its
  ``finally`` blocks run). Streamed runs are not kept for re-deliveries.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import inspect
import logging
import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from . import observe
from ._capture import RunCapture, activate, deactivate
from ._gate import Gate
from ._memory import release_large_buffers
from ._threads import DaemonThreadPool, call_in_thread
from .errors import ProtocolError
from .observe import _OBSERVERS, ExecutionInfo
from .protocol import (
    ORPHAN_POLICIES,
    decode_command,
    error_event,
    normalize_exception,
)

__all__ = ["Sink", "WorkerEngine", "release_large_buffers", "shared_threads"]

logger = logging.getLogger(__name__)

DEFAULT_THREADS = 64
#: Bytes of finished results kept for re-deliveries (see the module docstring).
DEFAULT_IDEMPOTENCY_CACHE_BYTES = 32 * 1024 * 1024
#: A result at least this large is kept only for ``large_result_ttl`` seconds.
DEFAULT_LARGE_RESULT_BYTES = 1024 * 1024
DEFAULT_LARGE_RESULT_TTL = 30.0

Sink = Callable[[dict[str, Any]], None]

_shared: tuple[int, DaemonThreadPool] | None = None
_shared_lock = threading.Lock()


def shared_threads() -> Executor:
    """This process's daemon threads for sync callables, shared by short-lived engines.

    An engine adapter's worker builds one :class:`WorkerEngine` per payload; passing
    ``threads=shared_threads()`` reuses this process's threads (started only when none is
    idle; at most :data:`DEFAULT_THREADS` run at once, more calls wait for one) instead of
    starting a thread per payload. Its threads are daemon threads (a sync call that was
    given up on never keeps the process alive), and results come back to the loop in
    batches. A forked child gets its own.
    """
    global _shared
    with _shared_lock:
        if _shared is None or _shared[0] != os.getpid():
            _shared = (os.getpid(), DaemonThreadPool(DEFAULT_THREADS, name="wove-shared"))
        return _shared[1]


@dataclass(eq=False, slots=True)
class _Execution:
    """One execution of a callable, shared by every run attached to it."""

    key: str | None
    policy: str
    subscribers: dict[str, tuple[str, Sink]] = field(default_factory=dict)
    #: what runs it: its task, or for a quick sync run the pool's future of its call
    task: asyncio.Future[Any] | None = None
    heartbeat: asyncio.TimerHandle | None = None
    #: capture the run's print() and logging output (``delivery_capture_output``)
    capture: bool = False
    #: a streamed run: items it may still produce before more credit (None: not streamed)
    credit: int | None = None
    credit_wake: asyncio.Event | None = None
    #: what observers see of it (:mod:`wove.observe`); None when none is installed
    observed: ExecutionInfo | None = None


class WorkerEngine:
    """Runs command frames and emits event frames (see the module docstring).

    Args:
        max_concurrency: runs executing at once.
        max_queued: runs admitted and waiting for a slot beyond ``max_concurrency``.
        threads: run sync callables in this ``concurrent.futures.Executor`` (an engine
            worker's own thread pool) instead of the engine's daemon threads; the engine
            never shuts it down.
        max_threads: threads for sync callables (default 64: sync tasks are mostly I/O-bound
            and the threads are only created when used).
        idempotency_cache_size: finished results kept for duplicate runs.
        idempotency_ttl: seconds a finished result is kept for duplicates.
        idempotency_cache_bytes: estimated bytes of finished results kept (default 32 MiB).
        large_result_bytes: a result estimated at least this large (default 1 MiB) is kept
            only for ``large_result_ttl`` seconds (default 30).
        remember_run_ids: also answer a re-sent ``run_id`` from the cache (network
            workers, where a client re-delivers after a lost connection).
        announce_start: emit ``task_started`` (in-process execution has no liveness to
            prove and skips it; heartbeats are still sent when a run asks for them).
        capture_output: honour ``delivery_capture_output`` (send a run's ``print()`` and
            ``logging`` output as ``log`` events); an in-process engine, whose output is
            already the caller's, turns it off.
        name: shown in logs and errors.
    """

    def __init__(
        self,
        *,
        max_concurrency: int = 256,
        max_queued: int | None = None,
        max_threads: int | None = None,
        threads: Executor | None = None,
        idempotency_cache_size: int = 1024,
        idempotency_ttl: float = 600.0,
        idempotency_cache_bytes: int = DEFAULT_IDEMPOTENCY_CACHE_BYTES,
        large_result_bytes: int = DEFAULT_LARGE_RESULT_BYTES,
        large_result_ttl: float = DEFAULT_LARGE_RESULT_TTL,
        remember_run_ids: bool = True,
        announce_start: bool = True,
        capture_output: bool = True,
        name: str = "worker",
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        for label, number in (("idempotency_cache_bytes", idempotency_cache_bytes),
                              ("large_result_bytes", large_result_bytes)):
            if not isinstance(number, int) or isinstance(number, bool) or number < 0:
                raise ValueError(f"{label} must be a non-negative integer (bytes), got {number!r}")
        self.name = name
        self.max_concurrency = max_concurrency
        self.max_queued = max_concurrency * 4 if max_queued is None else max_queued
        self._threads_size = max_threads or DEFAULT_THREADS
        self._threads: Executor | None = threads
        self._own_threads = threads is None
        self._slots = Gate(max_concurrency)
        self._admission = Gate(max_concurrency + self.max_queued)
        self._announce = announce_start
        self._capture_output = capture_output
        self._runs: dict[str, _Execution] = {}
        self._by_key: dict[str, _Execution] = {}
        # key -> (expires, estimated bytes, terminal event); insertion order = age
        self._finished: OrderedDict[str, tuple[float, int, dict[str, Any]]] = OrderedDict()
        self._cache_size = idempotency_cache_size
        self._ttl = idempotency_ttl
        self._cache_bytes_limit = idempotency_cache_bytes
        self._large = large_result_bytes
        self._large_ttl = min(large_result_ttl, idempotency_ttl)
        self._cached_bytes = 0
        self._sweeper: asyncio.TimerHandle | None = None
        self._remember_run_ids = remember_run_ids and idempotency_cache_size > 0
        self._closing = False

    # -- public API ------------------------------------------------------------
    @property
    def active(self) -> int:
        """Runs admitted and not yet finished."""
        return len(self._runs)

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def cached_results(self) -> tuple[int, int]:
        """``(entries, estimated bytes)`` of finished results kept for re-deliveries."""
        return len(self._finished), self._cached_bytes

    async def handle(self, data: bytes | str | dict[str, Any], sink: Sink) -> None:
        """Decode one command (bytes or parsed JSON already verified) and run it.

        Malformed commands never raise: they produce a ``task_error`` (source
        ``executor``) when the frame named a run, and a ``log`` event otherwise.
        """
        try:
            frame = decode_command(data)
        except ProtocolError as exc:
            self.reject(exc, sink)
            return
        await self.submit(frame, sink)

    def reject(self, exc: ProtocolError, sink: Sink) -> None:
        """Report a command that could not be decoded."""
        run_id = getattr(exc, "run_id", None)
        if run_id:
            logger.warning("%s rejected a command for run %s: %s", self.name, run_id, exc)
            self._safe(sink, error_event(
                run_id, getattr(exc, "task_id", run_id), kind="ProtocolError",
                message=f"Worker {self.name} could not decode run {run_id}: {exc}", source="executor",
            ))
        else:
            logger.warning("%s ignored a malformed command: %s", self.name, exc)
            self._safe(sink, {"type": "log", "message": f"Worker {self.name} ignored a malformed command: {exc}"})

    async def submit(self, frame: dict[str, Any], sink: Sink) -> None:
        """Run one decoded command frame; events of the run go to ``sink``."""
        frame_type = frame.get("type")
        if frame_type == "run_task":
            await self._run_task(frame, sink)
        elif frame_type == "cancel_task":
            self.cancel(str(frame.get("run_id")))
        elif frame_type == "stream_credit":
            self.grant(str(frame.get("run_id")), frame.get("credit"))
        elif frame_type == "shutdown":
            policy = frame.get("delivery_orphan_policy")
            await self.shutdown(policy if policy in ORPHAN_POLICIES else None)
        else:
            self.reject(ProtocolError(f"Unknown command type {frame_type!r}"), sink)

    def unsubscribe(self, run_id: str, sink: Sink, *, cancel: bool) -> None:
        """``sink`` (one client's delivery of ``run_id``) goes away before the run ended.

        Other deliveries of the same run keep theirs. When none is left, ``cancel`` cancels
        the execution; otherwise it keeps running and its terminal event is kept for a
        re-delivery (by ``run_id`` and idempotency key) like any finished run's.
        """
        execution = self._runs.get(run_id)
        if execution is None:
            return
        task_id, current = execution.subscribers[run_id]
        if isinstance(current, _Fanout) and current.remove(sink):
            return
        if current is not sink and not (isinstance(current, _Fanout) and not current.sinks):
            return  # a later delivery replaced this one: it owns the run now
        if cancel:
            self.cancel(run_id)
        else:
            execution.subscribers[run_id] = (task_id, _drop)

    def grant(self, run_id: str, credit: Any) -> bool:
        """``stream_credit``: the consumer of streamed run ``run_id`` takes ``credit`` more
        items; returns False for an unknown or unstreamed run (harmless, ignored)."""
        execution = self._runs.get(run_id)
        if execution is None or execution.credit is None or execution.credit_wake is None:
            logger.debug("%s: stream_credit for unknown or unstreamed run %s ignored", self.name, run_id)
            return False
        if not isinstance(credit, int) or isinstance(credit, bool) or credit < 1:
            logger.warning("%s: ignored stream_credit %r for run %s (a positive integer is expected)",
                           self.name, credit, run_id)
            return False
        execution.credit += credit
        execution.credit_wake.set()
        return True

    def cancel(self, run_id: str) -> bool:
        """Cancel a run; returns False for an unknown run (harmless)."""
        execution = self._runs.pop(run_id, None)
        if execution is None:
            logger.debug("%s: cancel for unknown run %s ignored", self.name, run_id)
            return False
        task_id, sink = execution.subscribers.pop(run_id)
        logger.debug("%s: cancelling run %s (task %s)", self.name, run_id, task_id)
        self._safe(sink, {"type": "task_cancelled", "run_id": run_id, "task_id": task_id})
        if not execution.subscribers and execution.task is not None:
            execution.task.cancel()
        return True

    async def shutdown(self, policy: str | None = None, *, grace: float = 10.0) -> None:
        """Stop accepting work and end the runs by orphan policy (module docstring).

        Args:
            policy: overrides each run's own ``delivery_orphan_policy`` when given.
            grace: seconds ``detach`` runs may take to finish before they are cancelled.
        """
        self._closing = True
        executions = {id(e): e for e in self._runs.values()}.values()
        waiting: list[asyncio.Future[Any]] = []
        for execution in list(executions):
            effective = policy or execution.policy
            if effective == "detach":
                if execution.task is not None:
                    waiting.append(execution.task)
                continue
            for run_id in list(execution.subscribers):
                task_id, sink = execution.subscribers.pop(run_id)
                self._runs.pop(run_id, None)
                if effective == "fail":
                    self._safe(sink, error_event(
                        run_id, task_id, kind="DeliveryOrphanedError", source="executor",
                        message=f"Worker {self.name} shut down while run {run_id} was in progress "
                        "(orphan policy 'fail').",
                    ))
                elif effective == "cancel":
                    self._safe(sink, {"type": "task_cancelled", "run_id": run_id, "task_id": task_id})
            if execution.task is not None:
                execution.task.cancel()
                waiting.append(execution.task)
        if waiting:
            _done, pending = await asyncio.wait(waiting, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        if self._threads is not None and self._own_threads:
            self._threads.shutdown(wait=False, cancel_futures=True)
            self._threads = None
        self._forget_all()

    async def drain(self, grace: float = 10.0) -> None:
        """A service's graceful stop: accept no new runs, let the running ones finish
        within ``grace`` seconds, then end what is left by orphan policy (as
        :meth:`shutdown` does: a terminal event for every run but ``requeue`` ones, which
        end silently so their clients deliver them elsewhere)."""
        self._closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        waited: set[asyncio.Future[Any]] = set()
        while True:  # again for what started meanwhile: a sync callable's awaitable goes on in a new task
            running = {execution.task for execution in self._runs.values() if execution.task is not None} - waited
            left = deadline - loop.time()
            if not running or left <= 0:
                break
            await asyncio.wait(running, timeout=left)
            waited |= running
        await self.shutdown(grace=0.0)

    async def run_inline(self, func: Callable[..., Any], args: dict[str, Any]) -> Any:
        """Await ``func(**args)`` in the calling task, within the concurrency cap; a sync
        ``func`` runs in the engine's thread pool (in a copy of the caller's context) and
        its result is awaited here.

        The in-process executor's fast path: no frame, no extra task. Cancelling the
        caller cancels the run (a sync call that already runs finishes in its thread; its
        result is dropped).
        """
        if self._closing:
            raise RuntimeError(f"Worker {self.name} is shutting down and accepts no new runs.")
        slots = self._slots
        if not slots.try_acquire():
            await slots.acquire()
        try:
            if _is_async(func):
                return await func(**args)
            return await self._call_sync(func, args)
        finally:
            slots.release()

    def _pool(self) -> Executor:
        if self._threads is None:
            self._threads = DaemonThreadPool(self._threads_size, name=f"wove-{self.name}")
        return self._threads

    async def _call_sync(self, func: Callable[..., Any], args: dict[str, Any]) -> Any:
        """``func(**args)`` in the thread pool, in a copy of this context (a run's capture
        goes with it); an awaitable it returns is awaited here."""
        threads = self._pool()
        call = functools.partial(contextvars.copy_context().run, func, **args)
        if isinstance(threads, DaemonThreadPool):  # results come back in batches
            result = await threads.run(call)
        else:  # an engine worker's own pool
            result = await asyncio.get_running_loop().run_in_executor(threads, call_in_thread, call)
        if inspect.isawaitable(result):
            result = await result
        return result

    async def aclose(self) -> None:
        """Cancel everything and release the thread pool."""
        await self.shutdown("cancel", grace=1.0)

    # -- running ---------------------------------------------------------------
    async def _run_task(self, frame: dict[str, Any], sink: Sink) -> None:
        run_id: str = frame["run_id"]
        task_id: str = frame["task_id"]
        delivery = frame.get("delivery") or {}
        if self._closing:
            self._safe(sink, error_event(
                run_id, task_id, kind="WorkerShuttingDown", retryable=True, source="executor",
                message=f"Worker {self.name} is shutting down and accepts no new runs; run {run_id} was not started.",
            ))
            return
        key = delivery.get("delivery_idempotency_key")
        key = str(key) if key is not None else None
        if self._attach(run_id, task_id, key, sink):
            return
        if not self._admission.try_acquire():
            await self._admission.acquire()
            if self._attach(run_id, task_id, key, sink):  # a twin may have started while we waited
                self._admission.release()
                return
        policy = delivery.get("delivery_orphan_policy") or "cancel"
        execution = _Execution(key=key, policy=policy, subscribers={run_id: (task_id, sink)},
                               capture=self._capture_output and delivery.get("delivery_capture_output") is True)
        window = delivery.get("delivery_stream_window")
        if isinstance(window, int) and not isinstance(window, bool) and window > 0:
            execution.credit = window
            execution.credit_wake = asyncio.Event()
        if _OBSERVERS:
            execution.observed = observe._execution(run_id, task_id, self.name, frame)
        self._runs[run_id] = execution
        if key is not None:
            self._by_key[key] = execution
        heartbeat = delivery.get("delivery_heartbeat_seconds")
        if isinstance(heartbeat, (int, float)) and heartbeat > 0:
            self._schedule_heartbeat(execution, max(float(heartbeat) / 3.0, 0.01))
        func, args = frame["callable"], frame.get("args") or {}
        if (execution.credit is None and execution.observed is None and not _is_async(func)
                and isinstance(threads := self._pool(), DaemonThreadPool) and self._slots.try_acquire()):
            self._start_sync(execution, threads, func, args)
        else:
            execution.task = asyncio.get_running_loop().create_task(self._execute(execution, func, args))

    def _start_sync(self, execution: _Execution, threads: DaemonThreadPool, func: Callable[..., Any],
                    args: dict[str, Any]) -> None:
        """A sync run that holds a slot and needs no task around its call (no observer, not
        streamed): handed to the pool at once, in a copy of this context (where its capture
        is the current one), and finished by a callback on the loop (a task's creation, its
        two steps and two coroutine frames were an eighth of what the loop spent on a quick
        sync run; docs/performance.md). Cancelling :attr:`_Execution.task`, the pool's
        future, ends it as cancelling a task does."""
        context = contextvars.copy_context()
        capture = None
        if execution.capture:
            capture = self._capture(execution)
            context.run(activate, capture)
        self._announce_start(execution)
        try:
            future = threads.run(functools.partial(context.run, func, **args))
        except RuntimeError as exc:  # a pool shut down under it: the run fails, as it would in a task
            self._end_sync(execution, capture, _task_error(exc))
            return
        execution.task = future
        future.add_done_callback(functools.partial(self._sync_done, execution, context, capture))

    def _sync_done(self, execution: _Execution, context: contextvars.Context, capture: RunCapture | None,
                   future: asyncio.Future[Any]) -> None:
        if future.cancelled():
            event: dict[str, Any] = {"type": "task_cancelled"}
        elif (exc := future.exception()) is not None:
            event = _task_error(exc)
        else:
            result = future.result()
            if inspect.isawaitable(result):  # a sync callable that returned an awaitable: awaited in a task
                loop = asyncio.get_running_loop()  # (of the run's context, where its capture is current)
                execution.task = context.run(loop.create_task, self._await_result(execution, capture, result))
                return
            event = {"type": "task_result", "result": result}
        self._end_sync(execution, capture, event)

    async def _await_result(self, execution: _Execution, capture: RunCapture | None, awaitable: Any) -> None:
        event: dict[str, Any] | None = None
        try:
            event = {"type": "task_result", "result": await awaitable}
        except asyncio.CancelledError:
            event = {"type": "task_cancelled"}
        except BaseException as exc:
            event = _task_error(exc)
        finally:
            self._end_sync(execution, capture, event)

    def _end_sync(self, execution: _Execution, capture: RunCapture | None, event: dict[str, Any] | None) -> None:
        self._slots.release()
        if capture is not None:
            capture.flush(final=True)  # the output goes before the terminal event
        self._finish(execution, event)

    def _attach(self, run_id: str, task_id: str, key: str | None, sink: Sink) -> bool:
        execution = self._runs.get(run_id) or (self._by_key.get(key) if key is not None else None)
        if execution is not None:
            logger.debug("%s: run %s attached to a running duplicate", self.name, run_id)
            previous = execution.subscribers.get(run_id)
            if previous is not None and previous[1] is not sink:
                # The same run delivered again (a client that lost its connection or gave up
                # on a request): both deliveries get the events; the client keeps one terminal.
                sink = _Fanout.join(previous[1], sink, self._safe)
            execution.subscribers[run_id] = (task_id, sink)
            self._runs[run_id] = execution
            self._safe(sink, {"type": "task_started", "run_id": run_id, "task_id": task_id})
            return True
        if not self._finished:
            return False
        for cache_key in (key, f"run:{run_id}"):
            cached = self._cached(cache_key) if cache_key is not None else None
            if cached is not None:
                logger.debug("%s: run %s answered from the idempotency cache", self.name, run_id)
                self._safe(sink, {"type": "task_started", "run_id": run_id, "task_id": task_id})
                self._safe(sink, {**cached, "run_id": run_id, "task_id": task_id})
                return True
        return False

    def _cached(self, key: str) -> dict[str, Any] | None:
        entry = self._finished.get(key)
        if entry is None:
            return None
        if entry[0] < time.monotonic():
            self._forget(key)
            return None
        return entry[2]

    def _remember(self, keys: list[str], event: dict[str, Any]) -> None:
        """Keep ``event`` for re-deliveries under ``keys`` (one execution: its size counts once)."""
        try:
            size = _estimate_size(event.get("result"), [_SIZE_BUDGET]) if event["type"] == "task_result" else 256
        except RecursionError:  # nested deeper than the stack: no transport can send it either
            return
        if size > self._cache_bytes_limit:
            logger.debug("%s: result of %s (~%d bytes) exceeds idempotency_cache_bytes; not kept",
                         self.name, keys, size)
            return
        expires = time.monotonic() + (self._large_ttl if size >= self._large else self._ttl)
        last = len(keys) - 1
        for index, key in enumerate(keys):
            self._forget(key)
            # the size is booked on the newest key, so older siblings are evicted first and
            # the event is never held by an entry that books no bytes after its sized twin left
            entry_size = size if index == last else 0
            self._finished[key] = (expires, entry_size, event)
            self._cached_bytes += entry_size
        finished = self._finished
        while finished and (len(finished) > self._cache_size or self._cached_bytes > self._cache_bytes_limit):
            _key, (_expires, dropped, _event) = finished.popitem(last=False)
            self._cached_bytes -= dropped
        if self._sweeper is None and finished:
            self._sweeper = asyncio.get_running_loop().call_later(min(self._large_ttl, 5.0), self._sweep)

    def _forget(self, key: str) -> None:
        entry = self._finished.pop(key, None)
        if entry is not None:
            self._cached_bytes -= entry[1]

    def _forget_all(self) -> None:
        self._finished.clear()
        self._cached_bytes = 0
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def _sweep(self) -> None:
        """Drop expired results (a timer: memory is given back without a lookup asking)."""
        self._sweeper = None
        now = time.monotonic()
        for key in [key for key, entry in self._finished.items() if entry[0] < now]:
            self._forget(key)
        if self._finished:
            self._sweeper = asyncio.get_running_loop().call_later(min(self._large_ttl, 5.0), self._sweep)

    def _schedule_heartbeat(self, execution: _Execution, interval: float) -> None:
        def beat() -> None:
            for run_id, (task_id, sink) in list(execution.subscribers.items()):
                self._safe(sink, {"type": "heartbeat", "run_id": run_id, "task_id": task_id})
            execution.heartbeat = loop.call_later(interval, beat)

        loop = asyncio.get_running_loop()
        execution.heartbeat = loop.call_later(interval, beat)

    def _capture(self, execution: _Execution) -> RunCapture:
        """The capture of one execution: its output goes to every run attached to it."""

        def emit(fields: dict[str, Any]) -> None:
            for run_id, (task_id, sink) in list(execution.subscribers.items()):
                self._safe(sink, {"type": "log", "run_id": run_id, "task_id": task_id, **fields})

        return RunCapture(asyncio.get_running_loop(), emit)

    async def _execute(self, execution: _Execution, func: Any, args: dict[str, Any]) -> None:
        event: dict[str, Any] | None = None
        slots = self._slots
        capture = self._capture(execution) if execution.capture else None
        observed = execution.observed
        if observed is not None:  # in this task: context the observer sets reaches the callable
            observe._call("execution_started", observed)
        try:
            if not slots.try_acquire():
                await slots.acquire()
            token = activate(capture) if capture is not None else None
            try:
                self._announce_start(execution)
                if execution.credit is not None:
                    await self._stream(execution, func, args)
                    result = None
                elif _is_async(func):
                    result = await func(**args)
                else:
                    result = await self._call_sync(func, args)
            finally:
                if token is not None:
                    deactivate(token)
                slots.release()
            event = {"type": "task_result", "result": result}
        except asyncio.CancelledError:
            event = {"type": "task_cancelled"}
        except BaseException as exc:  # a task's SystemExit is its error, not the worker's
            event = _task_error(exc)
        finally:
            if capture is not None:
                capture.flush(final=True)  # the output goes before the terminal event
            if observed is not None:
                _execution_finished(observed, event)
            self._finish(execution, event)

    def _announce_start(self, execution: _Execution) -> None:
        if self._announce:
            for run_id, (task_id, sink) in list(execution.subscribers.items()):
                self._safe(sink, {"type": "task_started", "run_id": run_id, "task_id": task_id})

    def _finish(self, execution: _Execution, event: dict[str, Any] | None) -> None:
        """An execution ended with ``event`` (None: it produced none): release what it held,
        keep the event for re-deliveries, send it to every run attached."""
        if execution.heartbeat is not None:
            execution.heartbeat.cancel()
        self._admission.release()
        if execution.key is not None and self._by_key.get(execution.key) is execution:
            del self._by_key[execution.key]
        if (event is not None and event["type"] != "task_cancelled" and self._cache_size > 0
                and execution.credit is None):
            keys = [execution.key] if execution.key is not None else []
            if self._remember_run_ids:
                keys.extend(f"run:{run_id}" for run_id in execution.subscribers)
            if keys:
                self._remember(keys, event)
        subscribers = execution.subscribers
        if event is not None and len(subscribers) == 1:
            run_id, (task_id, sink) = next(iter(subscribers.items()))
            self._runs.pop(run_id, None)
            event["run_id"] = run_id
            event["task_id"] = task_id
            self._safe(sink, event)
        else:
            for run_id, (task_id, sink) in list(subscribers.items()):
                self._runs.pop(run_id, None)
                if event is not None:
                    self._safe(sink, {**event, "run_id": run_id, "task_id": task_id})
        subscribers.clear()

    async def _stream(self, execution: _Execution, func: Any, args: dict[str, Any]) -> None:
        """Drive a streamed run's generator under credit (module docstring); returns None."""
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()  # the run's capture goes with the pulls into threads
        if inspect.isasyncgenfunction(func) or _is_async(func):
            source = func(**args)
        else:
            source = await loop.run_in_executor(self._pool(),
                                                functools.partial(context.run, call_in_thread, func, **args))
        if inspect.isawaitable(source) and not hasattr(source, "__anext__"):
            source = await source
        is_async = hasattr(source, "__anext__")
        if not is_async and not hasattr(source, "__next__"):
            raise TypeError(
                f"runtime.stream() needs a generator or async generator function; {_task_name(func)} returned "
                f"{type(source).__name__}. Use yield in the task, or runtime.call() for a single result.")
        wake = execution.credit_wake
        assert wake is not None
        pulling: concurrent.futures.Future[Any] | None = None
        seq = 0
        try:
            while True:
                while execution.credit is not None and execution.credit <= 0:
                    wake.clear()
                    await wake.wait()
                if is_async:
                    try:
                        item = await source.__anext__()
                    except StopAsyncIteration:
                        return None
                else:
                    assert self._threads is not None
                    pulling = self._threads.submit(context.run, _next, source)
                    item = await asyncio.wrap_future(pulling)
                    pulling = None
                    if item is _END:
                        return None
                if execution.credit is not None:
                    execution.credit -= 1
                for run_id, (task_id, sink) in list(execution.subscribers.items()):
                    self._safe(sink, {"type": "task_yield", "run_id": run_id, "task_id": task_id, "seq": seq,
                                      "item": item})
                seq += 1
        finally:
            await self._close_source(source, is_async, pulling, context)

    async def _close_source(self, source: Any, is_async: bool, pulling: concurrent.futures.Future[Any] | None,
                            context: contextvars.Context) -> None:
        """Close a streamed run's generator so its ``finally`` blocks run."""
        try:
            if is_async:
                close = getattr(source, "aclose", None)
                if close is not None:
                    await close()
                return
            close = getattr(source, "close", None)
            if close is None:
                return
            if pulling is not None and not pulling.done():
                # a thread is inside next(): close the generator when it comes out (that thread)
                pulling.add_done_callback(lambda _f: _quietly(context.run, close))
                return
            if self._threads is not None:
                await asyncio.get_running_loop().run_in_executor(self._threads, functools.partial(context.run, close))
            else:
                close()
        except Exception:
            logger.exception("%s: closing a streamed run's generator failed", self.name)

    def _safe(self, sink: Sink, event: dict[str, Any]) -> None:
        try:
            sink(event)
        except Exception:
            logger.exception("%s: could not deliver %s for run %s", self.name, event.get("type"), event.get("run_id"))


def _task_error(exc: BaseException) -> dict[str, Any]:
    return {"type": "task_error", "exception": exc, "error": normalize_exception(exc, source="task")}


def _execution_finished(observed: ExecutionInfo, event: dict[str, Any] | None) -> None:
    kind = event.get("type") if event is not None else None
    if kind == "task_result":
        observe._call("execution_finished", observed, "ok", None)
    elif kind == "task_error":
        observe._call("execution_finished", observed, "error", event.get("exception") if event else None)
    else:
        observe._call("execution_finished", observed, "cancelled", None)


def _quietly(func: Callable[..., Any], *args: Any) -> None:
    try:
        func(*args)
    except Exception:
        logger.exception("closing a streamed run's generator failed")


def _next(source: Any) -> Any:
    return next(source, _END)


#: what next() returns in the thread when a sync generator is exhausted
_END = object()


def _task_name(func: Any) -> str:
    return str(getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or type(func).__name__)


def _drop(event: dict[str, Any]) -> None:
    """The sink of a run whose client went away and that keeps running."""


class _Fanout:
    """The sinks of one run delivered more than once; each gets every event."""

    __slots__ = ("safe", "sinks")

    def __init__(self, sinks: list[Sink], safe: Callable[[Sink, dict[str, Any]], None]) -> None:
        self.sinks = sinks
        self.safe = safe

    @classmethod
    def join(cls, previous: Sink, sink: Sink, safe: Callable[[Sink, dict[str, Any]], None]) -> Sink:
        if isinstance(previous, _Fanout):
            previous.sinks.append(sink)
            return previous
        if previous is _drop:
            return sink
        return cls([previous, sink], safe)

    def remove(self, sink: Sink) -> bool:
        """Forget ``sink``; True when others remain."""
        if sink in self.sinks:
            self.sinks.remove(sink)
        return bool(self.sinks)

    def __call__(self, event: dict[str, Any]) -> None:
        for index, sink in enumerate(self.sinks):
            self.safe(sink, event if index == 0 else dict(event))


_SIZE_BUDGET = 10_000
_FLAT = (bytes, bytearray, str, memoryview)


def _estimate_size(value: Any, budget: list[int]) -> int:
    """A cheap estimate of the bytes ``value`` holds (a bounded walk: buffers count by
    length, containers by their items, objects with ``nbytes``, such as arrays, by that)."""
    budget[0] -= 1
    if isinstance(value, _FLAT):
        return len(value) if not isinstance(value, memoryview) else value.nbytes
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    size = sys.getsizeof(value, 64)
    if budget[0] <= 0:
        return size
    if isinstance(value, dict):
        for key, item in value.items():
            size += _estimate_size(key, budget) + _estimate_size(item, budget)
            if budget[0] <= 0:
                break
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            size += _estimate_size(item, budget)
            if budget[0] <= 0:
                break
    else:
        state = getattr(value, "__dict__", None)
        if isinstance(state, dict) and state:
            size += _estimate_size(state, budget)
    return size


_last_checked: list[Any] = [None, False]


def is_async_callable(func: Any) -> bool:
    """True for coroutine functions (and objects with an async ``__call__``)."""
    return _is_async(func)


def _is_async(func: Any) -> bool:
    if func is _last_checked[0]:  # hot loops call the same function again and again
        return bool(_last_checked[1])
    result = _check_async(func)
    _last_checked[0], _last_checked[1] = func, result
    return result


def _check_async(func: Any) -> bool:
    if inspect.iscoroutinefunction(func):
        return True
    call = getattr(func, "__call__", None)  # noqa: B004 - async __call__ on instances
    return call is not None and inspect.iscoroutinefunction(call)

