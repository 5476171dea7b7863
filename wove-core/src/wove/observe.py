"""Observing runs: the lifecycle hook tracing and metrics integrations are built on.

An *observer* is an object with some of the methods of :class:`Observer` (subclass it and
override what you need). Install it with :func:`add_observer`; from then on the runtime,
the transports and the worker engine of this process call it as runs go by::

    from wove.observe import Observer, add_observer

    class Timings(Observer):
        def run_finished(self, run, outcome, error):
            print(run.task, run.environment, outcome)

    add_observer(Timings())

``wove-otel`` is such an observer (OpenTelemetry traces, metrics and log correlation).
Nothing is imported for it here: importing ``wove`` imports no OpenTelemetry.

**The caller's side** (:class:`~wove.runtime.ExecutorRuntime`), per run: ``run_submitted``
(accepted, before any in-flight limit), ``run_sent`` (the executor took its ``run_task``;
not for async calls a local executor awaits inline), ``run_started`` (the worker's
``task_started``), ``run_heartbeat``, ``run_redelivered`` (the transport lost the run and
delivers it again, orphan policy ``requeue``), ``run_timed_out`` / ``run_cancelled``
(just before the matching ``run_finished``), and exactly one ``run_finished`` with the
outcome: one of :data:`OUTCOMES`. ``run_submitted`` and ``run_finished`` are called in the
asyncio task that awaits the run, so an observer may set context variables in the first
and reset them in the second (``wove-otel`` makes the run's span current that way), except
for a streamed run (``runtime.stream``, :attr:`RunInfo.streamed`), which the consumer
drives step by step: its hooks may come from different tasks.

**The worker's side** (:class:`~wove.worker.WorkerEngine`, every worker service and engine
adapter), per execution: ``execution_started`` in the asyncio task that runs the callable,
before it runs (a sync callable runs in a thread with a copy of that context, so context
variables set here reach it), and ``execution_finished`` in the same task before the
terminal event is sent. A run answered from the idempotency cache, or attached to a
running duplicate, is no new execution.

**Trace context.** An observer may put the W3C trace context of a run in
:attr:`RunInfo.carrier` in ``run_submitted`` (keys ``traceparent`` and ``tracestate``,
string values); the runtime sends them as fields of the ``run_task`` frame (a Wove 2.x peer
ignores them; ``docs/wire.md``) and engine adapters in the backend payload. The worker
side finds them in :attr:`ExecutionInfo.carrier`.

**Cost.** With no observer installed every call site is one truth test of a list: the
benchmark ``bench/bench_observer.py`` measures it. An observer that raises is logged
(once per observer and method) and does not affect the run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable
from typing import Any

from .errors import DeliveryOrphanedError, DeliveryTimeoutError

__all__ = [
    "OUTCOMES",
    "TRACE_FIELDS",
    "ExecutionInfo",
    "Observer",
    "RunInfo",
    "add_observer",
    "observers",
    "outcome_of",
    "remove_observer",
]

logger = logging.getLogger(__name__)

#: How a run or an execution ended: its result (``ok``), an exception (``error``: the
#: task's own or an executor's, transport's or configuration error), ``cancelled``,
#: ``timeout`` (``delivery_timeout`` or the heartbeat window passed) or ``orphaned``
#: (the runtime stopped, or the executor lost the run, under policy ``fail``,
#: ``requeue`` or ``detach``). The worker side reports ``ok``, ``error`` or ``cancelled``.
OUTCOMES = ("ok", "error", "cancelled", "timeout", "orphaned")

#: The trace-context fields a ``run_task`` frame may carry (W3C Trace Context).
TRACE_FIELDS = ("traceparent", "tracestate")

#: The installed observers. Call sites test this list itself (``if _OBSERVERS:``), so it
#: is only ever changed in place.
_OBSERVERS: list[Observer] = []
#: Runs in flight on the caller's side while observers are installed, by run id: the
#: transports report re-deliveries by run id.
_RUNS: dict[str, RunInfo] = {}
#: hook name -> the installed observers' own methods for it (inherited no-ops left out)
_BOUND: dict[str, tuple[Callable[..., None], ...]] = {}
_FAILED: set[tuple[int, str]] = set()


class RunInfo:
    """One run on the caller's side, as observers see it (the same object for every hook).

    Attributes:
        run_id: the run's id (``"<task>:<hex>"``), unique across processes.
        task: the task's name (``task_id`` of its frames).
        environment: the environment's name.
        executor: the executor's name (``"stdio"``, ``"grpc"``, ``"dask"``...; for an
            executor given as an instance, its ``executor_name`` or class name).
        executor_type: the executor's class.
        carrier: trace-context fields to send with the run (see the module docstring).
        deliveries: transmissions to a worker so far (re-deliveries included), as the
            transport reports them; 0 for an executor that does not report them.
        request_size: bytes of the encoded ``run_task`` of the latest delivery, when the
            transport reports it (the network and stdio transports do), else None.
        inline: True for an async call a local executor awaits in the caller's task.
        streamed: True for a streamed run (``runtime.stream``): ``run_submitted`` and
            ``run_finished`` may be called in different tasks; an outcome ``ok`` means
            the generator was exhausted, ``cancelled`` also that the consumer stopped early.
        data: a dict for the observers' own per-run state; key it by something of yours.
    """

    __slots__ = ("carrier", "data", "deliveries", "environment", "executor", "executor_type", "inline",
                 "request_size", "run_id", "streamed", "task")

    def __init__(self, run_id: str, task: str, environment: str, executor: str, executor_type: type,
                 *, inline: bool = False, streamed: bool = False) -> None:
        self.run_id = run_id
        self.task = task
        self.environment = environment
        self.executor = executor
        self.executor_type = executor_type
        self.inline = inline
        self.streamed = streamed
        self.carrier: dict[str, str] = {}
        self.deliveries = 0
        self.request_size: int | None = None
        self.data: dict[Any, Any] = {}

    def __repr__(self) -> str:
        return f"RunInfo({self.run_id!r}, environment={self.environment!r}, executor={self.executor!r})"


class ExecutionInfo:
    """One execution on the worker's side, as observers see it.

    Attributes:
        run_id: the run's id (the first delivery's, when duplicates share the execution).
        task: the task's name (``task_id``).
        worker: the worker engine's name (``"stdio:<pid>"``, ``"http"``, ``"grpc"``,
            ``"websocket"``, ``"local:<environment>"``; ``"backend:<engine>"`` for a run an
            engine adapter delivered: ``"backend:dask"``, ``"backend:celery"``...; plain
            ``"backend"`` when the payload names no engine).
        carrier: the trace-context fields the ``run_task`` carried (``traceparent``,
            ``tracestate``; only string values, others are ignored).
        delivery: the ``delivery`` field of the ``run_task`` (timeouts, orphan policy...).
        data: a dict for the observers' own per-execution state.
    """

    __slots__ = ("carrier", "data", "delivery", "run_id", "task", "worker")

    def __init__(self, run_id: str, task: str, worker: str, carrier: dict[str, str],
                 delivery: dict[str, Any]) -> None:
        self.run_id = run_id
        self.task = task
        self.worker = worker
        self.carrier = carrier
        self.delivery = delivery
        self.data: dict[Any, Any] = {}

    def __repr__(self) -> str:
        return f"ExecutionInfo({self.run_id!r}, worker={self.worker!r})"


class Observer:
    """The hooks an observer may implement; each does nothing here (override what you need).

    Every method is called on the event loop's thread and must return quickly (it is on
    the path of every run): record, do not block. See the module docstring for when each
    is called.
    """

    def run_submitted(self, run: RunInfo) -> None:
        """A run was accepted (before any in-flight limit); put trace context in ``run.carrier``."""

    def run_sent(self, run: RunInfo) -> None:
        """The executor took the run's ``run_task`` (``run.request_size`` may be known)."""

    def run_started(self, run: RunInfo) -> None:
        """The worker reported ``task_started``."""

    def run_heartbeat(self, run: RunInfo) -> None:
        """The worker reported a ``heartbeat``."""

    def run_redelivered(self, run: RunInfo, reason: str) -> None:
        """The transport lost the run (``reason`` says how) and delivers it again."""

    def run_timed_out(self, run: RunInfo, message: str) -> None:
        """``delivery_timeout`` or the heartbeat window passed (``message`` is the error's)."""

    def run_cancelled(self, run: RunInfo, message: str) -> None:
        """The run was cancelled (by the caller, the worker or the orphan policy)."""

    def run_finished(self, run: RunInfo, outcome: str, error: BaseException | None) -> None:
        """The run ended with ``outcome`` (one of :data:`OUTCOMES`); ``error`` is the
        exception the caller gets (None for ``ok``)."""

    def execution_started(self, execution: ExecutionInfo) -> None:
        """A worker is about to run a callable (called in the task that runs it)."""

    def execution_finished(self, execution: ExecutionInfo, outcome: str, error: BaseException | None) -> None:
        """The execution ended (``ok``, ``error`` with the task's exception, or ``cancelled``)."""


def add_observer(observer: Observer) -> None:
    """Install ``observer`` for every runtime and worker engine of this process.

    Adding the same object twice installs it once.

    Raises:
        TypeError: ``observer`` has none of the :class:`Observer` methods.
    """
    if not isinstance(observer, Observer) and not any(callable(getattr(observer, name, None)) for name in _HOOKS):
        raise TypeError(
            f"add_observer() needs an observer: an object with some of the methods {', '.join(_HOOKS)} "
            f"(subclass wove.observe.Observer); got {type(observer).__name__}."
        )
    if not any(existing is observer for existing in _OBSERVERS):
        _OBSERVERS.append(observer)
        _rebind()


def remove_observer(observer: Observer) -> bool:
    """Uninstall ``observer``; False when it was not installed."""
    for index, existing in enumerate(_OBSERVERS):
        if existing is observer:
            del _OBSERVERS[index]
            if not _OBSERVERS:
                _RUNS.clear()
            _rebind()
            return True
    return False


def observers() -> tuple[Observer, ...]:
    """The installed observers, in the order they are called."""
    return tuple(_OBSERVERS)


_HOOKS = tuple(name for name in vars(Observer) if name.startswith(("run_", "execution_")))


def _rebind() -> None:
    """Look the observers' methods up once per change, not once per call."""
    bound: dict[str, tuple[Callable[..., None], ...]] = {}
    for name in _HOOKS:
        methods = []
        for observer in _OBSERVERS:
            method = getattr(observer, name, None)
            if callable(method) and getattr(method, "__func__", None) is not getattr(Observer, name):
                methods.append(method)
        bound[name] = tuple(methods)
    _BOUND.clear()
    _BOUND.update(bound)


# -- dispatch (the call sites in runtime, transport and worker) --------------------------
def _call(name: str, *args: Any) -> None:
    for method in _BOUND.get(name, ()):
        try:
            method(*args)
        except Exception:
            observer = getattr(method, "__self__", method)
            key = (id(observer), name)
            if key in _FAILED:
                logger.debug("observer %r failed in %s again", observer, name, exc_info=True)
            else:
                _FAILED.add(key)
                logger.exception("observer %r failed in %s (the run is not affected; further failures of "
                                 "this method are logged at DEBUG)", observer, name)


def _submitted(run: RunInfo) -> None:
    if not run.inline:
        _RUNS[run.run_id] = run
    _call("run_submitted", run)


def _frame_fields(run: RunInfo, frame: dict[str, Any]) -> None:
    """Copy the trace context observers put in ``run.carrier`` into a ``run_task`` frame."""
    for key in TRACE_FIELDS:
        value = run.carrier.get(key)
        if isinstance(value, str) and value:
            frame[key] = value


def _event(run_id: str | None, frame_type: str) -> None:
    """A ``task_started`` or ``heartbeat`` for ``run_id`` reached the runtime."""
    run = _RUNS.get(run_id)  # type: ignore[arg-type]
    if run is not None:
        _call("run_started" if frame_type == "task_started" else "run_heartbeat", run)


def _transmitted(run_id: str, deliveries: int, size: int | None) -> None:
    """A transport transmits ``run_id`` (its ``deliveries``-th time, ``size`` bytes)."""
    run = _RUNS.get(run_id)
    if run is not None:
        run.deliveries = deliveries
        if size is not None:
            run.request_size = size


def _redelivered(run_id: str, reason: str) -> None:
    run = _RUNS.get(run_id)
    if run is not None:
        _call("run_redelivered", run, reason)


def _finished(run: RunInfo, error: BaseException | None) -> None:
    """End ``run``: classify ``error`` into an outcome and call the hooks."""
    _RUNS.pop(run.run_id, None)
    outcome = outcome_of(error)
    if outcome == "timeout":
        _call("run_timed_out", run, str(error))
    elif outcome == "cancelled":
        _call("run_cancelled", run, str(error) or "cancelled")
    _call("run_finished", run, outcome, error)


def _execution(run_id: str, task: str, worker: str, frame: dict[str, Any]) -> ExecutionInfo:
    carrier = {key: value for key in TRACE_FIELDS if isinstance(value := frame.get(key), str)}
    delivery = frame.get("delivery")
    return ExecutionInfo(run_id, task, worker, carrier, delivery if isinstance(delivery, dict) else {})


def outcome_of(error: BaseException | None) -> str:
    """The outcome (:data:`OUTCOMES`) of a run that ended with ``error`` (None: ``ok``)."""
    if error is None:
        return "ok"
    if isinstance(error, DeliveryTimeoutError):
        return "timeout"
    if isinstance(error, DeliveryOrphanedError):
        return "orphaned"
    if isinstance(error, (asyncio.CancelledError, concurrent.futures.CancelledError)):
        return "cancelled"
    return "error"
