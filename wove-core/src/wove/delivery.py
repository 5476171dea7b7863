"""Delivery bookkeeping of :class:`~wove.runtime.ExecutorRuntime`, without I/O of its own.

* :class:`DeliveryDefaults` resolves an environment's ``delivery_*`` settings once (the
  environment definition over ``run_config``) and, per call, lays ``task_info`` over
  them into a :class:`Delivery`: cancel mode, orphan policy, timeout, heartbeat window,
  in-flight limit and the computed idempotency key. When neither ``task_info`` nor the
  key depends on the call, the same (immutable) :class:`Delivery` is returned every
  time: the hot path allocates nothing.
* :func:`idempotency_key` turns ``delivery_idempotency_key`` (a string, a format string
  over the task's arguments, or a callable) into the key sent in ``delivery``.
* :class:`Run` is the record of one ``run_task`` frame awaiting its terminal event; it
  owns the timer for ``delivery_timeout`` and the heartbeat window (:meth:`Run.arm`),
  which fails the run's future with :class:`DeliveryTimeoutError` when it expires.
* :class:`InlineRun` is the record of an async call the runtime awaits inline (executors
  with ``runs_inline``); :func:`inline_timer` arms its ``delivery_timeout``.
* :func:`orphaned_error` and :func:`lost_error` word what a pending run ends with when
  the runtime stops or its executor stops delivering events.
* :func:`task_exception` turns a ``task_error`` event into the exception the caller
  gets: the task's own, with the worker's traceback as ``__cause__`` and a note saying
  where it was raised, or :class:`EnvironmentExecutionError`.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any

from ._capture import HOST
from ._threads import future_exception
from .config import check_choice
from .errors import (
    DeliveryOrphanedError,
    DeliveryTimeoutError,
    EnvironmentExecutionError,
    RemoteTraceback,
)
from .protocol import CANCEL_MODES, ORPHAN_POLICIES

__all__ = [
    "DELIVERY_KEYS",
    "Delivery",
    "DeliveryDefaults",
    "InlineRun",
    "Run",
    "idempotency_key",
    "inline_timer",
    "lost_error",
    "orphaned_error",
    "task_exception",
]

#: The settings resolved from ``task_info``, then the definition, then ``run_config``.
DELIVERY_KEYS = (
    "delivery_timeout",
    "delivery_idempotency_key",
    "delivery_cancel_mode",
    "delivery_heartbeat_seconds",
    "delivery_orphan_policy",
    "delivery_max_in_flight",
)
_DELIVERY_KEY_SET = frozenset(DELIVERY_KEYS)


@dataclass(frozen=True, slots=True)
class Delivery:
    """The delivery settings of one call, resolved and checked."""

    cancel_mode: str
    orphan_policy: str
    timeout: float | None
    heartbeat: float | None
    #: positive int, or None for no limit
    max_in_flight: int | None
    #: the computed key (None: no ``delivery_idempotency_key``)
    idempotency_key: str | None
    #: ask the worker for the run's print() and logging output (definition ``capture_output``)
    capture_output: bool = True

    def fields(self) -> dict[str, Any]:
        """The ``delivery`` field of the ``run_task`` frame (non-None values only)."""
        delivery: dict[str, Any] = {"delivery_cancel_mode": self.cancel_mode,
                                    "delivery_orphan_policy": self.orphan_policy}
        if self.capture_output:
            delivery["delivery_capture_output"] = True
        if self.timeout is not None:
            delivery["delivery_timeout"] = self.timeout
        if self.heartbeat is not None:
            delivery["delivery_heartbeat_seconds"] = self.heartbeat
        if self.idempotency_key is not None:
            delivery["delivery_idempotency_key"] = self.idempotency_key
        return delivery


class DeliveryDefaults:
    """An environment's delivery settings: its definition over ``run_config``.

    Raises:
        ConfigError: an invalid ``delivery_cancel_mode`` or ``delivery_orphan_policy``
            (the message names the environment, the key and the allowed values).
    """

    __slots__ = ("_fixed", "capture_output", "settings")

    def __init__(self, environment: str, definition: dict[str, Any], run_config: dict[str, Any]) -> None:
        settings: dict[str, Any] = {}
        for key in DELIVERY_KEYS:
            value = definition.get(key)
            if value is None:
                value = run_config.get(key)
            if value is not None:
                settings[key] = value
        where = f"Environment '{environment}' (run_config)"
        check_choice(settings.get("delivery_cancel_mode"), "delivery_cancel_mode", CANCEL_MODES, where)
        check_choice(settings.get("delivery_orphan_policy"), "delivery_orphan_policy", ORPHAN_POLICIES, where)
        #: the resolved ``delivery_*`` values (None values left out)
        self.settings = settings
        #: the definition's ``capture_output`` (default True)
        self.capture_output = definition.get("capture_output") is not False
        # a key computed from each call's arguments cannot be shared between calls
        self._fixed = None if "delivery_idempotency_key" in settings else _resolve(
            settings, "", {}, self.capture_output)

    def for_call(self, task_name: str, task_args: dict[str, Any], task_info: dict[str, Any]) -> Delivery:
        """Lay the call's ``task_info`` over the defaults.

        Raises:
            ConfigError: an invalid ``delivery_cancel_mode`` / ``delivery_orphan_policy``.
            ValueError: ``delivery_idempotency_key`` could not be formatted with the
                task's arguments.
        """
        if _DELIVERY_KEY_SET.isdisjoint(task_info):
            if self._fixed is not None:
                return self._fixed
            return _resolve(self.settings, task_name, task_args, self.capture_output)
        settings = {**self.settings, **{k: v for k, v in task_info.items() if k in _DELIVERY_KEY_SET and v is not None}}
        return _resolve(settings, task_name, task_args, self.capture_output)


def _resolve(settings: dict[str, Any], task_name: str, task_args: dict[str, Any],
             capture_output: bool = True) -> Delivery:
    get = settings.get
    cancel_mode = get("delivery_cancel_mode") or "best_effort"
    orphan_policy = get("delivery_orphan_policy") or "cancel"
    if cancel_mode not in CANCEL_MODES:
        check_choice(cancel_mode, "delivery_cancel_mode", CANCEL_MODES, f"Task '{task_name}'")
    if orphan_policy not in ORPHAN_POLICIES:
        check_choice(orphan_policy, "delivery_orphan_policy", ORPHAN_POLICIES, f"Task '{task_name}'")
    max_in_flight = get("delivery_max_in_flight")
    raw_key = get("delivery_idempotency_key")
    return Delivery(
        cancel_mode=cancel_mode,
        orphan_policy=orphan_policy,
        timeout=get("delivery_timeout"),
        heartbeat=get("delivery_heartbeat_seconds"),
        max_in_flight=max_in_flight if isinstance(max_in_flight, int) and max_in_flight > 0 else None,
        idempotency_key=None if raw_key is None else idempotency_key(raw_key, task_args, task_name),
        capture_output=capture_output,
    )


def idempotency_key(raw: Any, task_args: dict[str, Any], task_name: str) -> str | None:
    """The key sent for ``delivery_idempotency_key=raw``.

    A callable gets the arguments dict (or, when it does not take one argument, the
    arguments as keywords); a string with ``{fields}`` is formatted with the arguments;
    any other value is used as its ``str()``.

    Raises:
        ValueError: a format string names a field the task's arguments lack (the message
            lists the arguments).
    """
    if raw is None:
        return None
    if callable(raw):
        try:
            value = raw(task_args)
        except TypeError:
            value = raw(**task_args)
        return str(value)
    if isinstance(raw, str):
        if "{" in raw:
            try:
                return raw.format_map(task_args)
            except (KeyError, IndexError, ValueError, AttributeError) as exc:
                raise ValueError(
                    f"delivery_idempotency_key {raw!r} of task '{task_name}' could not be formatted "
                    f"with the task's arguments ({type(exc).__name__}: {exc}); available: "
                    f"{', '.join(sorted(task_args)) or '(none)'}."
                ) from exc
        return raw
    return str(raw)


@dataclass(eq=False, slots=True)
class Run:
    """One ``run_task`` frame awaiting its terminal event."""

    run_id: str
    task_id: str
    environment: str
    future: asyncio.Future[Any]
    cancel_mode: str
    orphan_policy: str
    heartbeat: float | None
    deadline: float | None
    last_seen: float
    timeout: float | None = None
    timer: asyncio.TimerHandle | None = None
    ack: asyncio.Future[str] | None = None
    #: True once the runtime itself settled the future (event, timer, orphaning), so
    #: a CancelledError is not the caller cancelling us.
    settled: bool = False

    @classmethod
    def start(cls, loop: asyncio.AbstractEventLoop, run_id: str, task_id: str, environment: str,
              delivery: Delivery) -> Run:
        """A new record, its timer armed when the delivery has a timeout or heartbeat window."""
        now = loop.time()
        timeout = float(delivery.timeout) if delivery.timeout else None
        heartbeat = float(delivery.heartbeat) if delivery.heartbeat else None
        # positional: the keyword call costs a third more on this hot path
        run = cls(run_id, task_id, environment, loop.create_future(), delivery.cancel_mode, delivery.orphan_policy,
                  heartbeat, now + timeout if timeout else None, now, timeout)
        if timeout or heartbeat:
            run.arm(loop)
        return run

    def cancel_frame(self) -> dict[str, Any]:
        """The ``cancel_task`` command for this run."""
        return {
            "type": "cancel_task",
            "run_id": self.run_id,
            "task_id": self.task_id,
            "delivery_cancel_mode": self.cancel_mode,
            "delivery_orphan_policy": self.orphan_policy,
        }

    def seen(self, loop: asyncio.AbstractEventLoop) -> None:
        """A ``task_started`` or ``heartbeat`` arrived: the heartbeat window restarts."""
        self.last_seen = loop.time()

    def settle(self, *, result: Any = None, error: BaseException | None = None, cancelled: bool = False) -> None:
        """End the run's future (by the runtime, not the caller), unless it has ended."""
        if self.future.done():
            return
        self.settled = True
        if cancelled:
            self.future.cancel()
        elif error is not None:
            # a Wove 2.x worker reports the StopIteration a sync task raised; a future refuses one
            self.future.set_exception(future_exception(error))
        else:
            self.future.set_result(result)

    # -- timers ------------------------------------------------------------------------
    def arm(self, loop: asyncio.AbstractEventLoop) -> None:
        """Schedule the next check: the deadline or the end of the heartbeat window."""
        when = self.deadline if self.deadline is not None else float("inf")
        if self.heartbeat is not None:
            when = min(when, self.last_seen + self.heartbeat)
        self.timer = loop.call_at(when, self._check, loop)

    def clear_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _check(self, loop: asyncio.AbstractEventLoop) -> None:
        self.timer = None
        if self.future.done():
            return
        now = loop.time()
        where = f"Task '{self.task_id}' (run {self.run_id}) in environment '{self.environment}'"
        if self.deadline is not None and now >= self.deadline:
            self.settle(error=DeliveryTimeoutError(
                f"{where} did not finish within delivery_timeout={self.timeout:g}s."
            ))
        elif self.heartbeat is not None and now - self.last_seen >= self.heartbeat:
            self.settle(error=DeliveryTimeoutError(
                f"{where} sent no heartbeat for {now - self.last_seen:.2f}s "
                f"(delivery_heartbeat_seconds={self.heartbeat:g}); the worker is presumed lost."
            ))
        else:
            self.arm(loop)


@dataclass(eq=False, slots=True)
class InlineRun:
    """An async callable awaited in the caller's task (executors with ``runs_inline``)."""

    run_id: str
    task_id: str
    task: asyncio.Task[Any]
    orphan_policy: str
    #: set when the runtime cancels the run: raised instead of CancelledError
    reason: BaseException | None = None
    cancelled_by_runtime: bool = False

    def interrupt(self, reason: BaseException | None) -> None:
        """Cancel the caller's task; it then raises ``reason`` (None: CancelledError)."""
        if self.cancelled_by_runtime:
            return
        self.cancelled_by_runtime = True
        self.reason = reason
        self.task.cancel()


def inline_timer(loop: asyncio.AbstractEventLoop, run: InlineRun, environment: str,
                 timeout: float | None) -> asyncio.TimerHandle | None:
    """Arm ``delivery_timeout`` of an inline run (None when it has none)."""
    if not timeout:
        return None
    return loop.call_later(float(timeout), run.interrupt, DeliveryTimeoutError(
        f"Task '{run.task_id}' (run {run.run_id}) in environment '{environment}' did not finish "
        f"within delivery_timeout={float(timeout):g}s; the in-process run was cancelled."
    ))


_ORPHAN_DETAIL = {
    "fail": "the run was cancelled",
    "requeue": "the runtime stopped, so it cannot be re-delivered",
    "detach": "it was detached and may still complete on the worker; no cancel_task was sent",
}


def orphaned_error(run: Run | InlineRun, environment: str) -> DeliveryOrphanedError | None:
    """What a run pending when the runtime stops ends with (None: policy ``cancel``)."""
    if run.orphan_policy == "cancel":
        return None
    head = (f"Task '{run.task_id}' (run {run.run_id}) in environment '{environment}' was orphaned "
            f"when the runtime stopped (delivery_orphan_policy='{run.orphan_policy}')")
    if isinstance(run, InlineRun):
        return DeliveryOrphanedError(f"{head}; the in-process run was cancelled.")
    return DeliveryOrphanedError(f"{head}: {_ORPHAN_DETAIL[run.orphan_policy]}.")


def lost_error(run: Run, environment: str, executor: str, exc: BaseException) -> BaseException:
    """What a pending run ends with when its executor's ``recv()`` raised ``exc``."""
    message = (
        f"Task '{run.task_id}' (run {run.run_id}) in environment '{environment}' cannot finish: "
        f"executor {executor} stopped delivering events ({type(exc).__name__}: {exc})."
    )
    error: BaseException = (
        RuntimeError(message) if run.orphan_policy == "cancel"
        else DeliveryOrphanedError(f"{message} (delivery_orphan_policy='{run.orphan_policy}')")
    )
    error.__cause__ = exc
    return error


def task_exception(frame: dict[str, Any], environment: str) -> BaseException:
    """The exception a ``task_error`` event ends its call with.

    * The task's own exception when it came with the event (unpickled, or the object
      itself in process). One raised in another process lost its traceback on the way:
      the worker's formatted traceback becomes its ``__cause__`` (a
      :class:`RemoteTraceback`, as ``ProcessPoolExecutor`` does) and a note names the
      environment, task, run, host and pid. One raised in this process (the payload's
      host and pid are ours) keeps its own traceback and is returned untouched.
    * Otherwise :class:`EnvironmentExecutionError` carrying the payload; for a task's
      error its message names the remote exception type and message, its ``traceback``
      the worker's traceback text (also its ``__cause__``), and the note says why the
      exception could not be rebuilt here when that is known.
    """
    payload = frame.get("error")
    if not isinstance(payload, dict):
        payload = {"message": str(payload), "kind": "ExecutionError", "source": "executor"}
    exception = frame.get("exception")
    if isinstance(exception, BaseException):
        if payload.get("pid") == os.getpid() and payload.get("host") == HOST:
            return exception  # raised in this process: its own traceback is the real one
        _attach_origin(exception, frame, payload, environment)
        return exception
    error = EnvironmentExecutionError(payload)
    if payload.get("source") == "task":
        reason = frame.get("exception_unpickle_error")
        _attach_origin(error, frame, payload, environment,
                       f"The {payload.get('kind') or 'exception'} could not be rebuilt here ({reason})." if reason
                       else None)
    return error


def _attach_origin(exception: BaseException, frame: dict[str, Any], payload: dict[str, Any], environment: str,
                   extra: str | None = None) -> None:
    text = payload.get("traceback")
    if isinstance(text, str) and text.strip() and not isinstance(exception.__cause__, RemoteTraceback):
        exception.__cause__ = RemoteTraceback(text)
    where = f"environment '{environment}', task '{frame.get('task_id')}' (run {frame.get('run_id')})"
    host, pid = payload.get("host"), payload.get("pid")
    if host or pid:
        where += f", host {host or '?'}, pid {pid if pid is not None else '?'}"
    else:
        where += ", on a worker that does not report its host and pid"
    note = f"Raised in {where}." + (f" {extra}" if extra else "")
    notes = getattr(exception, "__notes__", None)
    if isinstance(notes, list) and note in notes:
        return
    try:
        # add_note is 3.11+; on 3.10 the same attribute, which tools there read too
        exception.__notes__ = [*(notes or ()), note]  # type: ignore[attr-defined]
    except (AttributeError, TypeError):  # an exception class with __slots__ and no __dict__
        pass
