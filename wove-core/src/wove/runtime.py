"""ExecutorRuntime: many tasks over many named environments, with delivery policy."""

from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import uuid4

from ._gate import Gate
from .config import check_choice, validate_definition
from .errors import DeliveryOrphanedError, DeliveryTimeoutError, EnvironmentExecutionError
from .executor import EnvironmentExecutor
from .local import LocalEnvironmentExecutor
from .protocol import CANCEL_MODES, ORPHAN_POLICIES, TERMINAL_EVENTS
from .worker import is_async_callable

__all__ = ["ExecutorRuntime", "coerce_executor"]

logger = logging.getLogger(__name__)

_DELIVERY_KEYS = (
    "delivery_timeout",
    "delivery_idempotency_key",
    "delivery_cancel_mode",
    "delivery_heartbeat_seconds",
    "delivery_orphan_policy",
    "delivery_max_in_flight",
)
_DELIVERY_KEY_SET = frozenset(_DELIVERY_KEYS)
#: How long require_ack waits for the executor's task_cancelled.
CANCEL_ACK_TIMEOUT = 5.0


def coerce_executor(executor_value: Any, *, environment: str | None = None) -> EnvironmentExecutor:
    """Return an executor for a definition's ``executor`` value.

    Accepts an executor instance, an executor class, or a registered name.

    Raises:
        ValueError: unknown executor name.
        TypeError: any other value.
    """
    if isinstance(executor_value, EnvironmentExecutor):
        return executor_value
    if isinstance(executor_value, type) and issubclass(executor_value, EnvironmentExecutor):
        return executor_value()
    if isinstance(executor_value, str):
        from .registry import get_registry

        return get_registry().build(executor_value, environment=environment)
    where = f" of environment '{environment}'" if environment else ""
    raise TypeError(
        f"Environment 'executor'{where} must be a string or EnvironmentExecutor instance, "
        f"got {type(executor_value).__name__}."
    )


@dataclass(eq=False, slots=True)
class _Run:
    run_id: str
    task_id: str
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

    def cancel_frame(self) -> dict[str, Any]:
        return {
            "type": "cancel_task",
            "run_id": self.run_id,
            "task_id": self.task_id,
            "delivery_cancel_mode": self.cancel_mode,
            "delivery_orphan_policy": self.orphan_policy,
        }


@dataclass(eq=False, slots=True)
class _InlineRun:
    """An async callable awaited in the caller's task (in-process fast path)."""

    run_id: str
    task_id: str
    task: asyncio.Task[Any]
    orphan_policy: str
    #: set when the runtime cancels the run: raised instead of CancelledError
    reason: BaseException | None = None
    cancelled_by_runtime: bool = False


@dataclass(eq=False)
class _Environment:
    name: str
    definition: dict[str, Any]
    executor: EnvironmentExecutor
    pending: dict[str, _Run] = field(default_factory=dict)
    receiver: asyncio.Task[None] | None = None
    failure: BaseException | None = None
    limits: dict[int, Gate] = field(default_factory=dict)
    #: delivery settings of the definition over run_config, resolved once
    defaults: dict[str, Any] = field(default_factory=dict)
    #: the executor is the built-in in-process one: async calls may run inline
    inline: bool = False
    inline_runs: dict[str, _InlineRun] = field(default_factory=dict)


class ExecutorRuntime:
    """Multiplexes task execution over environment executors.

    Args:
        environment_definitions: environment name → definition (see :mod:`wove.config`).
        run_config: run-wide defaults for the ``delivery_*`` settings, and
            ``default_environment``.

    Delivery settings are resolved from ``task_info``, then the environment definition,
    then ``run_config``. Use as an async context manager::

        async with ExecutorRuntime({"workers": {"executor": "stdio"}}) as runtime:
            total = await runtime.call("workers", sum, [1, 2, 3])
    """

    def __init__(
        self,
        environment_definitions: dict[str, dict[str, Any]] | None = None,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        self._definitions: dict[str, dict[str, Any]] = dict(environment_definitions or {})
        self._run_config: dict[str, Any] = dict(run_config or {})
        self._environments: dict[str, _Environment] = {}
        self._lock: asyncio.Lock | None = None
        self._debug = logger.isEnabledFor(logging.DEBUG)
        # run ids: "<task>:<hex>", unique across runtimes (workers cache results by run id)
        self._id_prefix = uuid4().hex[:16]
        self._ids = itertools.count(1)

    # -- lifecycle -------------------------------------------------------------
    async def __aenter__(self) -> ExecutorRuntime:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start every defined environment's executor."""
        self._debug = logger.isEnabledFor(logging.DEBUG)
        try:
            for name, definition in list(self._definitions.items()):
                await self.ensure_environment(name, definition)
        except BaseException:
            await self.stop()
            raise

    async def ensure_environment(self, environment_name: str, definition: dict[str, Any]) -> None:
        """Start ``environment_name`` with ``definition`` unless it is already running.

        Raises:
            ConfigError: the definition is invalid (names the key and the fix).
            ValueError: the executor name is unknown.
            Exception: whatever the executor's ``start()`` raised, with the environment
                named in a note.
        """
        if environment_name in self._environments:
            return
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if environment_name in self._environments:
                return
            validate_definition(environment_name, definition, check_executor=False)
            executor = coerce_executor(definition.get("executor", "local"), environment=environment_name)
            executor_config = dict(definition.get("executor_config") or {})
            if definition.get("max_workers") is not None:
                executor_config.setdefault("max_workers", definition["max_workers"])
            logger.debug("starting environment %s with %s", environment_name, type(executor).__name__)
            try:
                await executor.start(
                    environment_name=environment_name,
                    environment_config=executor_config,
                    run_config=self._run_config,
                )
            except Exception as exc:
                note = f"while starting environment '{environment_name}' ({type(executor).__name__})"
                # add_note is 3.11+; on 3.10 the same attribute, which tools there read too
                exc.__notes__ = [*getattr(exc, "__notes__", ()), note]
                raise
            self._definitions[environment_name] = definition
            env = _Environment(environment_name, definition, executor)
            env.inline = type(executor) is LocalEnvironmentExecutor
            for key in _DELIVERY_KEYS:
                value = definition.get(key)
                if value is None:
                    value = self._run_config.get(key)
                if value is not None:
                    env.defaults[key] = value
            check_choice(env.defaults.get("delivery_cancel_mode"), "delivery_cancel_mode", CANCEL_MODES, f"Environment '{environment_name}' (run_config)")
            check_choice(env.defaults.get("delivery_orphan_policy"), "delivery_orphan_policy", ORPHAN_POLICIES, f"Environment '{environment_name}' (run_config)")
            env.receiver = asyncio.get_running_loop().create_task(
                self._receive(env), name=f"wove-recv:{environment_name}"
            )
            self._environments[environment_name] = env

    async def stop(self) -> None:
        """Stop every environment; pending runs end by their orphan policy.

        ``cancel`` → the awaiting call gets CancelledError; ``fail`` and ``requeue`` →
        DeliveryOrphanedError; ``detach`` → DeliveryOrphanedError and no ``cancel_task``.
        """
        environments = list(self._environments.values())
        self._environments.clear()
        for env in environments:
            await self._orphan(env)
            try:
                shutdown: dict[str, Any] = {"type": "shutdown"}
                if self._run_config.get("delivery_orphan_policy") in ORPHAN_POLICIES:
                    shutdown["delivery_orphan_policy"] = self._run_config["delivery_orphan_policy"]
                await env.executor.send(shutdown)
            except Exception as exc:
                logger.debug("environment %s: shutdown frame not delivered: %r", env.name, exc)
            if env.receiver is not None:
                env.receiver.cancel()
                await asyncio.gather(env.receiver, return_exceptions=True)
            try:
                await env.executor.stop()
            except Exception:
                logger.exception("environment %s: executor stop() failed", env.name)
            logger.debug("stopped environment %s", env.name)

    async def _orphan(self, env: _Environment) -> None:
        for inline in list(env.inline_runs.values()):
            self._interrupt_inline(inline, None if inline.orphan_policy == "cancel" else DeliveryOrphanedError(
                f"Task '{inline.task_id}' (run {inline.run_id}) in environment '{env.name}' was orphaned "
                f"when the runtime stopped (delivery_orphan_policy='{inline.orphan_policy}'); the "
                "in-process run was cancelled."
            ))
        for run in list(env.pending.values()):
            if run.future.done():
                continue
            self._clear_timer(run)
            if run.orphan_policy != "detach":
                try:
                    await env.executor.send(run.cancel_frame())
                except Exception as exc:
                    logger.debug("environment %s: cancel for %s not delivered: %r", env.name, run.run_id, exc)
            if run.future.done():
                continue
            run.settled = True
            if run.orphan_policy == "cancel":
                run.future.cancel()
            else:
                detail = {
                    "fail": "the run was cancelled",
                    "requeue": "the runtime stopped, so it cannot be re-delivered",
                    "detach": "it was detached and may still complete on the worker; no cancel_task was sent",
                }[run.orphan_policy]
                run.future.set_exception(DeliveryOrphanedError(
                    f"Task '{run.task_id}' (run {run.run_id}) in environment '{env.name}' was orphaned "
                    f"when the runtime stopped (delivery_orphan_policy='{run.orphan_policy}'): {detail}."
                ))

    # -- queries ---------------------------------------------------------------
    def is_local_environment(self, environment_name: str) -> bool:
        """True when the environment runs tasks in this process."""
        env = self._environments.get(environment_name)
        if env is not None:
            return isinstance(env.executor, LocalEnvironmentExecutor)
        executor = self._definitions.get(environment_name, {}).get("executor", "local")
        if isinstance(executor, str):
            return executor == "local"
        return isinstance(executor, LocalEnvironmentExecutor) or executor is LocalEnvironmentExecutor

    # -- running ---------------------------------------------------------------
    async def call(self, environment: str, func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Run ``func(*args, **kwargs)`` in ``environment`` and return its result."""
        return await self.call_with(environment, func, args, kwargs)

    async def call_with(
        self,
        environment: str,
        func: Callable[..., Any],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        task_name: str | None = None,
        **task_info: Any,
    ) -> Any:
        """Like :meth:`call`, with delivery settings (``delivery_timeout=…`` and so on)."""
        task_func, task_args = _keyword_call(func, args, kwargs or {})
        name = task_name or getattr(func, "__name__", None) or type(func).__name__
        return await self.run_task(
            task_name=name, task_func=task_func, task_args=task_args,
            task_info={**task_info, "environment": environment},
        )

    async def run_task(
        self,
        *,
        task_name: str,
        task_func: Any,
        task_args: dict[str, Any],
        task_info: dict[str, Any],
    ) -> Any:
        """Run ``task_func(**task_args)`` in ``task_info["environment"]``.

        Raises:
            NameError: unknown environment.
            ValueError: invalid ``delivery_cancel_mode`` or ``delivery_orphan_policy``.
            DeliveryTimeoutError: ``delivery_timeout`` passed, or no heartbeat within
                ``delivery_heartbeat_seconds`` (a ``cancel_task`` is sent).
            DeliveryOrphanedError: the runtime stopped, or the executor lost the run.
            asyncio.CancelledError: the run was cancelled.
            EnvironmentExecutionError: the executor reported an error it could not
                turn back into the task's own exception.
            Exception: the task's own exception.
        """
        environment_name = task_info.get("environment") or self._run_config.get("default_environment")
        env = self._environments.get(environment_name)  # type: ignore[arg-type]
        if env is None:
            known = ", ".join(sorted(self._environments)) or "(none started)"
            raise NameError(
                f"Task '{task_name}' references unknown environment '{environment_name}'. "
                f"Known environments: {known}."
            )
        if env.failure is not None:
            raise RuntimeError(
                f"Environment '{env.name}' cannot run task '{task_name}': its executor "
                f"{type(env.executor).__name__} stopped delivering events ({env.failure!r})."
            ) from env.failure
        settings = env.defaults
        if not _DELIVERY_KEY_SET.isdisjoint(task_info):
            settings = {**settings, **{k: v for k, v in task_info.items() if k in _DELIVERY_KEYS and v is not None}}
        get = settings.get
        cancel_mode = get("delivery_cancel_mode") or "best_effort"
        orphan_policy = get("delivery_orphan_policy") or "cancel"
        if cancel_mode not in CANCEL_MODES:
            check_choice(cancel_mode, "delivery_cancel_mode", CANCEL_MODES, f"Task '{task_name}'")
        if orphan_policy not in ORPHAN_POLICIES:
            check_choice(orphan_policy, "delivery_orphan_policy", ORPHAN_POLICIES, f"Task '{task_name}'")
        timeout = get("delivery_timeout")
        heartbeat = get("delivery_heartbeat_seconds")
        max_in_flight = get("delivery_max_in_flight")
        raw_key = get("delivery_idempotency_key")

        delivery: dict[str, Any] = {"delivery_cancel_mode": cancel_mode, "delivery_orphan_policy": orphan_policy}
        if timeout is not None:
            delivery["delivery_timeout"] = timeout
        if heartbeat is not None:
            delivery["delivery_heartbeat_seconds"] = heartbeat
        if raw_key is not None:
            delivery["delivery_idempotency_key"] = _idempotency_key(raw_key, task_args, task_name)

        limit = None
        if isinstance(max_in_flight, int) and max_in_flight > 0:
            limit = env.limits.get(max_in_flight)
            if limit is None:
                limit = env.limits[max_in_flight] = Gate(max_in_flight)
            if not limit.try_acquire():
                await limit.acquire()
        try:
            if env.inline and raw_key is None and is_async_callable(task_func):
                return await self._run_inline(env, task_name, task_func, task_args, orphan_policy, timeout)
            return await self._deliver(env, task_name, task_func, task_args, delivery, timeout, heartbeat)
        finally:
            if limit is not None:
                limit.release()

    async def _deliver(
        self,
        env: _Environment,
        task_name: str,
        task_func: Any,
        task_args: dict[str, Any],
        delivery: dict[str, Any],
        timeout: float | None,
        heartbeat: float | None,
    ) -> Any:
        loop = asyncio.get_running_loop()
        now = loop.time()
        run_id = f"{task_name}:{self._id_prefix}{next(self._ids):x}"
        run = _Run(
            run_id=run_id,
            task_id=task_name,
            future=loop.create_future(),
            cancel_mode=delivery["delivery_cancel_mode"],
            orphan_policy=delivery["delivery_orphan_policy"],
            heartbeat=float(heartbeat) if heartbeat else None,
            deadline=now + float(timeout) if timeout else None,
            last_seen=now,
            timeout=float(timeout) if timeout else None,
        )
        env.pending[run_id] = run
        if self._debug:
            logger.debug("environment=%s run_id=%s task_id=%s: run_task", env.name, run_id, task_name)
        try:
            if run.deadline is not None or run.heartbeat is not None:
                self._arm(env, run)  # before send: a send held up by backpressure counts too
            await env.executor.send({
                "type": "run_task",
                "run_id": run_id,
                "task_id": task_name,
                "callable": task_func,
                "args": task_args,
                "delivery": delivery,
            })
            try:
                return await run.future
            except DeliveryTimeoutError as exc:
                confirmed = await self._send_cancel(env, run)
                raise DeliveryTimeoutError(f"{exc} {confirmed}") from None
            except asyncio.CancelledError:
                if not run.settled:  # our caller cancelled the run: tell the executor
                    run.settled = True
                    await self._send_cancel(env, run)
                raise
        finally:
            self._clear_timer(run)
            env.pending.pop(run_id, None)

    async def _run_inline(
        self,
        env: _Environment,
        task_name: str,
        task_func: Any,
        task_args: dict[str, Any],
        orphan_policy: str,
        timeout: float | None,
    ) -> Any:
        task = asyncio.current_task()
        assert task is not None
        run = _InlineRun(f"{task_name}:{self._id_prefix}{next(self._ids):x}", task_name, task, orphan_policy)
        env.inline_runs[run.run_id] = run
        timer = None
        if timeout:
            timer = asyncio.get_running_loop().call_later(
                float(timeout), self._interrupt_inline, run, DeliveryTimeoutError(
                    f"Task '{task_name}' (run {run.run_id}) in environment '{env.name}' did not finish "
                    f"within delivery_timeout={float(timeout):g}s; the in-process run was cancelled."
                ),
            )
        try:
            return await env.executor.run_inline(task_func, task_args)  # type: ignore[attr-defined]
        except asyncio.CancelledError:
            if run.cancelled_by_runtime:
                uncancel = getattr(task, "uncancel", None)
                if uncancel is not None:
                    uncancel()
                if run.reason is not None:
                    raise run.reason from None
            raise
        finally:
            if timer is not None:
                timer.cancel()
            env.inline_runs.pop(run.run_id, None)

    @staticmethod
    def _interrupt_inline(run: _InlineRun, reason: BaseException | None) -> None:
        if run.cancelled_by_runtime:
            return
        run.cancelled_by_runtime = True
        run.reason = reason
        run.task.cancel()

    async def _send_cancel(self, env: _Environment, run: _Run) -> str:
        """Send cancel_task; with require_ack wait (bounded) for task_cancelled."""
        if run.cancel_mode == "require_ack":
            run.ack = asyncio.get_running_loop().create_future()
        try:
            await env.executor.send(run.cancel_frame())
        except Exception as exc:
            logger.debug("environment=%s run_id=%s: cancel_task failed: %r", env.name, run.run_id, exc)
            return f"cancel_task could not be sent ({exc!r})."
        if run.ack is None:
            return "cancel_task was sent (best_effort)."
        try:
            outcome = await asyncio.wait_for(asyncio.shield(run.ack), CANCEL_ACK_TIMEOUT)
        except asyncio.TimeoutError:
            return f"The executor did not confirm the cancellation within {CANCEL_ACK_TIMEOUT:g}s."
        if outcome == "task_cancelled":
            return "The executor confirmed the cancellation."
        return f"The executor answered with {outcome} instead of confirming the cancellation."

    # -- timers ----------------------------------------------------------------
    def _arm(self, env: _Environment, run: _Run) -> None:
        loop = asyncio.get_running_loop()
        when = run.deadline if run.deadline is not None else float("inf")
        if run.heartbeat is not None:
            when = min(when, run.last_seen + run.heartbeat)
        run.timer = loop.call_at(when, self._check_deadline, env, run)

    def _check_deadline(self, env: _Environment, run: _Run) -> None:
        run.timer = None
        if run.future.done():
            return
        now = asyncio.get_running_loop().time()
        where = f"Task '{run.task_id}' (run {run.run_id}) in environment '{env.name}'"
        if run.deadline is not None and now >= run.deadline:
            run.settled = True
            run.future.set_exception(DeliveryTimeoutError(
                f"{where} did not finish within delivery_timeout={run.timeout:g}s."
            ))
        elif run.heartbeat is not None and now - run.last_seen >= run.heartbeat:
            run.settled = True
            run.future.set_exception(DeliveryTimeoutError(
                f"{where} sent no heartbeat for {now - run.last_seen:.2f}s "
                f"(delivery_heartbeat_seconds={run.heartbeat:g}); the worker is presumed lost."
            ))
        else:
            self._arm(env, run)

    @staticmethod
    def _clear_timer(run: _Run) -> None:
        if run.timer is not None:
            run.timer.cancel()
            run.timer = None

    # -- receiving -------------------------------------------------------------
    async def _receive(self, env: _Environment) -> None:
        pending = env.pending
        recv = env.executor.recv
        loop = asyncio.get_running_loop()
        try:
            while True:
                frame = await recv()
                frame_type = frame.get("type")
                if frame_type == "log":
                    logger.info("environment %s: %s", env.name, frame.get("message"))
                    continue
                run = pending.get(frame.get("run_id"))  # type: ignore[arg-type]
                if run is None:
                    if self._debug:
                        logger.debug("environment=%s: %s for finished or unknown run %s",
                                     env.name, frame_type, frame.get("run_id"))
                    continue
                if frame_type == "task_started" or frame_type == "heartbeat":
                    run.last_seen = loop.time()
                    continue
                if self._debug:
                    logger.debug("environment=%s run_id=%s task_id=%s: %s",
                                 env.name, run.run_id, run.task_id, frame_type)
                if frame_type in TERMINAL_EVENTS:
                    if run.ack is not None and not run.ack.done():
                        run.ack.set_result(frame_type)
                    if run.future.done():
                        continue
                    run.settled = True
                    if frame_type == "task_result":
                        run.future.set_result(frame.get("result"))
                    elif frame_type == "task_cancelled":
                        run.future.cancel()
                    else:
                        run.future.set_exception(_exception_from_error(frame))
                else:
                    run.settled = True
                    run.future.set_exception(RuntimeError(
                        f"Unknown executor frame type {frame_type!r} from environment '{env.name}' "
                        f"for run {run.run_id}."
                    ))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            env.failure = exc
            logger.error("environment %s: executor %s stopped delivering events: %r",
                         env.name, type(env.executor).__name__, exc)
            for run in list(pending.values()):
                if run.future.done():
                    continue
                run.settled = True
                run.future.set_exception(_receiver_failure(env, run, exc))
            raise


def _receiver_failure(env: _Environment, run: _Run, exc: BaseException) -> BaseException:
    message = (
        f"Task '{run.task_id}' (run {run.run_id}) in environment '{env.name}' cannot finish: "
        f"executor {type(env.executor).__name__} stopped delivering events ({type(exc).__name__}: {exc})."
    )
    error: BaseException = (
        RuntimeError(message) if run.orphan_policy == "cancel"
        else DeliveryOrphanedError(f"{message} (delivery_orphan_policy='{run.orphan_policy}')")
    )
    error.__cause__ = exc
    return error


def _exception_from_error(frame: dict[str, Any]) -> BaseException:
    exception = frame.get("exception")
    if isinstance(exception, BaseException):
        return exception
    payload = frame.get("error")
    if not isinstance(payload, dict):
        payload = {"message": str(payload), "kind": "ExecutionError", "source": "executor"}
    return EnvironmentExecutionError(payload)


def _idempotency_key(raw: Any, task_args: dict[str, Any], task_name: str) -> str | None:
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


def _keyword_call(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Callable[..., Any], dict[str, Any]]:
    """Express ``func(*args, **kwargs)`` as ``callable(**task_args)``."""
    if not args:
        return func, kwargs
    try:
        bound = inspect.signature(func).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return functools.partial(func, *args), kwargs
    parameters = inspect.signature(func).parameters
    if any(parameters[name].kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.VAR_POSITIONAL)
           for name in bound.arguments):
        return functools.partial(func, *args), kwargs
    named = dict(bound.arguments)
    for name, param in parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD and name in named:
            named.update(named.pop(name))
    return func, named

