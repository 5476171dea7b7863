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
from .config import validate_definition
from .delivery import (
    Delivery,
    DeliveryDefaults,
    InlineRun,
    Run,
    inline_timer,
    lost_error,
    orphaned_error,
)
from .errors import ConfigError, DeliveryTimeoutError, EnvironmentExecutionError
from .executor import EnvironmentExecutor
from .protocol import ORPHAN_POLICIES, TERMINAL_EVENTS
from .worker import is_async_callable

__all__ = ["ExecutorRuntime", "coerce_executor"]

logger = logging.getLogger(__name__)

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


@dataclass(eq=False)
class _Environment:
    name: str
    definition: dict[str, Any]
    executor: EnvironmentExecutor
    #: delivery settings of the definition over run_config, resolved once
    defaults: DeliveryDefaults
    pending: dict[str, Run] = field(default_factory=dict)
    receiver: asyncio.Task[None] | None = None
    failure: BaseException | None = None
    limits: dict[int, Gate] = field(default_factory=dict)
    #: the executor declares ``runs_inline``: async calls without a key are awaited inline
    inline: bool = False
    inline_runs: dict[str, InlineRun] = field(default_factory=dict)


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
                _check_max_workers(environment_name, definition, executor)
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
                exc.__notes__ = [*getattr(exc, "__notes__", ()), note]  # type: ignore[attr-defined]
                raise
            self._definitions[environment_name] = definition
            defaults = DeliveryDefaults(environment_name, definition, self._run_config)
            env = _Environment(environment_name, definition, executor, defaults)
            env.inline = bool(getattr(executor, "runs_inline", False))
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
            inline.interrupt(orphaned_error(inline, env.name))
        for run in list(env.pending.values()):
            if run.future.done():
                continue
            run.clear_timer()
            if run.orphan_policy != "detach":
                try:
                    await env.executor.send(run.cancel_frame())
                except Exception as exc:
                    logger.debug("environment %s: cancel for %s not delivered: %r", env.name, run.run_id, exc)
            error = orphaned_error(run, env.name)
            run.settle(error=error, cancelled=error is None)

    # -- queries ---------------------------------------------------------------
    def is_local_environment(self, environment_name: str) -> bool:
        """True when the environment's executor runs calls in this process (``runs_inline``)."""
        env = self._environments.get(environment_name)
        if env is not None:
            return env.inline
        executor = self._definitions.get(environment_name, {}).get("executor", "local")
        if isinstance(executor, str):
            return executor == "local"
        return bool(getattr(executor, "runs_inline", False))

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
        delivery = env.defaults.for_call(task_name, task_args, task_info)
        limit = None
        max_in_flight = delivery.max_in_flight
        if max_in_flight is not None:
            limit = env.limits.get(max_in_flight)
            if limit is None:
                limit = env.limits[max_in_flight] = Gate(max_in_flight)
            if not limit.try_acquire():
                await limit.acquire()
        try:
            if env.inline and delivery.idempotency_key is None and is_async_callable(task_func):
                return await self._run_inline(env, task_name, task_func, task_args, delivery)
            return await self._deliver(env, task_name, task_func, task_args, delivery)
        finally:
            if limit is not None:
                limit.release()

    async def _deliver(
        self,
        env: _Environment,
        task_name: str,
        task_func: Any,
        task_args: dict[str, Any],
        delivery: Delivery,
    ) -> Any:
        run_id = f"{task_name}:{self._id_prefix}{next(self._ids):x}"
        # armed before send: a send held up by backpressure counts too
        run = Run.start(asyncio.get_running_loop(), run_id, task_name, env.name, delivery)
        env.pending[run_id] = run
        if self._debug:
            logger.debug("environment=%s run_id=%s task_id=%s: run_task", env.name, run_id, task_name)
        try:
            await env.executor.send({
                "type": "run_task",
                "run_id": run_id,
                "task_id": task_name,
                "callable": task_func,
                "args": task_args,
                "delivery": delivery.fields(),
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
            run.clear_timer()
            env.pending.pop(run_id, None)

    async def _run_inline(
        self,
        env: _Environment,
        task_name: str,
        task_func: Any,
        task_args: dict[str, Any],
        delivery: Delivery,
    ) -> Any:
        task = asyncio.current_task()
        assert task is not None
        run = InlineRun(f"{task_name}:{self._id_prefix}{next(self._ids):x}", task_name, task, delivery.orphan_policy)
        env.inline_runs[run.run_id] = run
        timer = inline_timer(asyncio.get_running_loop(), run, env.name, delivery.timeout) if delivery.timeout else None
        try:
            return await env.executor.run_inline(task_func, task_args)
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

    async def _send_cancel(self, env: _Environment, run: Run) -> str:
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
                    run.seen(loop)
                    continue
                if self._debug:
                    logger.debug("environment=%s run_id=%s task_id=%s: %s",
                                 env.name, run.run_id, run.task_id, frame_type)
                if frame_type in TERMINAL_EVENTS:
                    if run.ack is not None and not run.ack.done():
                        run.ack.set_result(frame_type)
                    if frame_type == "task_result":
                        run.settle(result=frame.get("result"))
                    elif frame_type == "task_cancelled":
                        run.settle(cancelled=True)
                    else:
                        run.settle(error=_exception_from_error(frame))
                else:
                    run.settle(error=RuntimeError(
                        f"Unknown executor frame type {frame_type!r} from environment '{env.name}' "
                        f"for run {run.run_id}."
                    ))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            env.failure = exc
            executor_name = type(env.executor).__name__
            logger.error("environment %s: executor %s stopped delivering events: %r", env.name, executor_name, exc)
            for run in list(pending.values()):
                run.settle(error=lost_error(run, env.name, executor_name, exc))
            raise


def _check_max_workers(environment: str, definition: dict[str, Any], executor: EnvironmentExecutor) -> None:
    """The definition-level ``max_workers`` reaches only executors whose spec has it (local)."""
    spec = executor.config_options
    if spec is not None and "max_workers" in spec:
        return
    value = definition.get("executor")
    label = value if isinstance(value, str) else type(executor).__name__
    known = f" (its keys: {', '.join(sorted(spec.options)) or 'none'})" if spec is not None else ""
    raise ConfigError(
        f"Environment '{environment}': max_workers = {definition['max_workers']!r} sizes the thread pool of the "
        f"local executor; the {label} executor has no such setting. Remove max_workers from the definition, "
        f"and put the {label} executor's own options in executor_config{known}."
    )


def _exception_from_error(frame: dict[str, Any]) -> BaseException:
    exception = frame.get("exception")
    if isinstance(exception, BaseException):
        return exception
    payload = frame.get("error")
    if not isinstance(payload, dict):
        payload = {"message": str(payload), "kind": "ExecutionError", "source": "executor"}
    return EnvironmentExecutionError(payload)


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

