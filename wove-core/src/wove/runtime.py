"""ExecutorRuntime: many tasks over many named environments, with delivery policy."""

from __future__ import annotations

import asyncio
import collections
import difflib
import functools
import inspect
import itertools
import logging
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn, ParamSpec, TypeVar, Union, overload
from uuid import uuid4

from . import observe
from ._capture import show_output
from ._gate import Gate
from .config import validate_definition
from .delivery import (
    DELIVERY_KEYS,
    Delivery,
    DeliveryDefaults,
    InlineRun,
    Run,
    inline_timer,
    lost_error,
    orphaned_error,
    task_exception,
)
from .errors import ConfigError, DeliveryTimeoutError
from .executor import EnvironmentExecutor
from .futures import DEFAULT_MAP_BUFFERSIZE, MapIterator, MapProgress, RunFuture, map_source
from .observe import _OBSERVERS, RunInfo
from .progress import reporter_for
from .protocol import CANCEL_MODES, CAPABILITY_TASK_YIELD, ORPHAN_POLICIES, TERMINAL_EVENTS
from .streaming import DEFAULT_STREAM_WINDOW, RunStream, StreamState, stream_not_supported
from .transport import FrameExecutor
from .worker import is_async_callable

__all__ = ["CancelMode", "ExecutorRuntime", "OrphanPolicy", "coerce_executor"]

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")
A1 = TypeVar("A1")
A2 = TypeVar("A2")
#: ``map``'s inputs: sync or async iterables
_In = Union[Iterable[A1], AsyncIterable[A1]]
#: ``map``'s ``progress``: a bar (True), none (False), or a callable receiving the counts
_Progress = Union[bool, Callable[[MapProgress], object]]
CancelMode = Literal["best_effort", "require_ack"]
OrphanPolicy = Literal["fail", "cancel", "requeue", "detach"]
#: the task_info of a call without delivery settings (never mutated)
_NO_INFO: dict[str, Any] = {}

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
    #: ... and sync calls too (``runs_sync_inline``)
    inline_sync: bool = False
    inline_runs: dict[str, InlineRun] = field(default_factory=dict)
    #: streamed runs (runtime.stream): run_id -> the items that arrived, not yet taken
    streams: dict[str, StreamState] = field(default_factory=dict)
    #: the executor's name as observers see it (:attr:`wove.observe.RunInfo.executor`)
    label: str = ""


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
            env.inline_sync = env.inline and bool(getattr(executor, "runs_sync_inline", False))
            env.label = _executor_label(definition, executor)
            loop = asyncio.get_running_loop()
            if isinstance(executor, FrameExecutor):
                executor.deliver_events_to(_Inbox(self, env, loop))
            env.receiver = loop.create_task(self._receive(env), name=f"wove-recv:{environment_name}")
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
            if isinstance(env.executor, FrameExecutor):
                env.executor.deliver_events_to(None)
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
    @overload
    async def call(self, environment: str, func: Callable[P, Awaitable[R]], /,
                   *args: P.args, **kwargs: P.kwargs) -> R: ...
    @overload
    async def call(self, environment: str, func: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R: ...
    async def call(self, environment: str, func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Run ``func(*args, **kwargs)`` in ``environment`` and return its result.

        The same as ``await runtime.submit(environment, func, *args, **kwargs)``, without
        a task of its own: the run is awaited in the calling task (cancelling it cancels
        the run, with a ``cancel_task`` to the executor).
        """
        task_func, task_args = _keyword_call(func, args, kwargs)
        name = _task_name(func)
        env, delivery = self._prepare(environment, name, task_args, _NO_INFO)
        if _inline_without_limit(env, delivery, task_func) and not _OBSERVERS:  # the hot path: one coroutine less
            return await self._run_inline(env, name, task_func, task_args, delivery, self._new_run_id(name))
        return await self._execute(env, name, task_func, task_args, delivery, self._new_run_id(name))

    @overload
    def submit(self, environment: str, func: Callable[P, Awaitable[R]], /,
               *args: P.args, **kwargs: P.kwargs) -> RunFuture[R]: ...
    @overload
    def submit(self, environment: str, func: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> RunFuture[R]: ...
    def submit(self, environment: str, func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> RunFuture[Any]:
        """Start ``func(*args, **kwargs)`` in ``environment``; return its :class:`RunFuture` at once.

        Call it in a coroutine (the run is a task of the running loop). The environment
        and the delivery settings are checked here, so a mistake raises at the call.

        Raises:
            NameError: unknown environment.
            RuntimeError: the environment's executor stopped delivering events.
        """
        task_func, task_args = _keyword_call(func, args, kwargs)
        return self._submit(environment, _task_name(func), task_func, task_args, _NO_INFO)

    @overload
    def submit_with(self, environment: str, func: Callable[..., Awaitable[R]], args: tuple[Any, ...] = ...,
                    kwargs: dict[str, Any] | None = ..., *, task_name: str | None = ..., delivery_timeout: float | None = ...,
                    delivery_heartbeat_seconds: float | None = ..., delivery_cancel_mode: CancelMode | None = ...,
                    delivery_orphan_policy: OrphanPolicy | None = ..., delivery_max_in_flight: int | None = ...,
                    delivery_idempotency_key: str | Callable[..., object] | None = ..., **unknown: NoReturn
                    ) -> RunFuture[R]: ...
    @overload
    def submit_with(self, environment: str, func: Callable[..., R], args: tuple[Any, ...] = ...,
                    kwargs: dict[str, Any] | None = ..., *, task_name: str | None = ..., delivery_timeout: float | None = ...,
                    delivery_heartbeat_seconds: float | None = ..., delivery_cancel_mode: CancelMode | None = ...,
                    delivery_orphan_policy: OrphanPolicy | None = ..., delivery_max_in_flight: int | None = ...,
                    delivery_idempotency_key: str | Callable[..., object] | None = ..., **unknown: NoReturn
                    ) -> RunFuture[R]: ...
    def submit_with(
        self,
        environment: str,
        func: Callable[..., Awaitable[R]] | Callable[..., R],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        task_name: str | None = None,
        delivery_timeout: float | None = None,
        delivery_heartbeat_seconds: float | None = None,
        delivery_cancel_mode: CancelMode | None = None,
        delivery_orphan_policy: OrphanPolicy | None = None,
        delivery_max_in_flight: int | None = None,
        delivery_idempotency_key: str | Callable[..., object] | None = None,
        **unknown: NoReturn,
    ) -> RunFuture[R]:
        """Like :meth:`submit`, with the delivery settings of :meth:`call_with`."""
        info = _call_settings(environment, func, task_name, locals(), unknown)
        task_func, task_args = _keyword_call(func, args, kwargs or {})
        return self._submit(environment, task_name or _task_name(func), task_func, task_args, info)

    @overload
    async def call_with(self, environment: str, func: Callable[..., Awaitable[R]], args: tuple[Any, ...] = ...,
                        kwargs: dict[str, Any] | None = ..., *, task_name: str | None = ..., delivery_timeout: float | None = ...,
                        delivery_heartbeat_seconds: float | None = ..., delivery_cancel_mode: CancelMode | None = ...,
                        delivery_orphan_policy: OrphanPolicy | None = ..., delivery_max_in_flight: int | None = ...,
                        delivery_idempotency_key: str | Callable[..., object] | None = ..., **unknown: NoReturn
                        ) -> R: ...
    @overload
    async def call_with(self, environment: str, func: Callable[..., R], args: tuple[Any, ...] = ...,
                        kwargs: dict[str, Any] | None = ..., *, task_name: str | None = ..., delivery_timeout: float | None = ...,
                        delivery_heartbeat_seconds: float | None = ..., delivery_cancel_mode: CancelMode | None = ...,
                        delivery_orphan_policy: OrphanPolicy | None = ..., delivery_max_in_flight: int | None = ...,
                        delivery_idempotency_key: str | Callable[..., object] | None = ..., **unknown: NoReturn
                        ) -> R: ...
    async def call_with(
        self,
        environment: str,
        func: Callable[..., Awaitable[R]] | Callable[..., R],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        task_name: str | None = None,
        delivery_timeout: float | None = None,
        delivery_heartbeat_seconds: float | None = None,
        delivery_cancel_mode: CancelMode | None = None,
        delivery_orphan_policy: OrphanPolicy | None = None,
        delivery_max_in_flight: int | None = None,
        delivery_idempotency_key: str | Callable[..., object] | None = None,
        **unknown: NoReturn,
    ) -> R:
        """Like :meth:`call`, with delivery settings for this call.

        ``func(*args, **kwargs)`` runs with ``delivery_timeout`` (seconds),
        ``delivery_heartbeat_seconds`` (seconds), ``delivery_cancel_mode``
        (``best_effort``/``require_ack``), ``delivery_orphan_policy``
        (``fail``/``cancel``/``requeue``/``detach``), ``delivery_max_in_flight`` (positive
        int) and ``delivery_idempotency_key`` (string, format string over the arguments, or
        callable) over the environment's settings; None keeps the environment's.

        Raises:
            ConfigError: an unknown keyword (with the closest setting's name) or a value of
                the wrong type, at the call, before anything is sent.
        """
        info = _call_settings(environment, func, task_name, locals(), unknown)
        task_func, task_args = _keyword_call(func, args, kwargs or {})
        name = task_name or _task_name(func)
        env, delivery = self._prepare(environment, name, task_args, info)
        return await self._execute(env, name, task_func, task_args, delivery,  # type: ignore[no-any-return]
                                   self._new_run_id(name))

    @overload
    def map(self, environment: str, func: Callable[[A1], Awaitable[R]], iterable: _In[A1], /, *,
            ordered: bool = ..., return_exceptions: Literal[False] = ..., buffersize: int | None = ...,
            progress: _Progress = ...) -> MapIterator[R]: ...
    @overload
    def map(self, environment: str, func: Callable[[A1], R], iterable: _In[A1], /, *,
            ordered: bool = ..., return_exceptions: Literal[False] = ..., buffersize: int | None = ...,
            progress: _Progress = ...) -> MapIterator[R]: ...
    @overload
    def map(self, environment: str, func: Callable[[A1, A2], Awaitable[R]], iterable: _In[A1],
            iterable2: _In[A2], /, *, ordered: bool = ..., return_exceptions: Literal[False] = ...,
            buffersize: int | None = ..., progress: _Progress = ...) -> MapIterator[R]: ...
    @overload
    def map(self, environment: str, func: Callable[[A1, A2], R], iterable: _In[A1], iterable2: _In[A2], /, *,
            ordered: bool = ..., return_exceptions: Literal[False] = ..., buffersize: int | None = ...,
            progress: _Progress = ...) -> MapIterator[R]: ...
    @overload
    def map(self, environment: str, func: Callable[[A1], Awaitable[R]], iterable: _In[A1], /, *,
            ordered: bool = ..., return_exceptions: Literal[True], buffersize: int | None = ...,
            progress: _Progress = ...) -> MapIterator[R | BaseException]: ...
    @overload
    def map(self, environment: str, func: Callable[[A1], R], iterable: _In[A1], /, *,
            ordered: bool = ..., return_exceptions: Literal[True], buffersize: int | None = ...,
            progress: _Progress = ...) -> MapIterator[R | BaseException]: ...
    @overload
    def map(self, environment: str, func: Callable[[A1, A2], Awaitable[R]], iterable: _In[A1],
            iterable2: _In[A2], /, *, ordered: bool = ..., return_exceptions: Literal[True],
            buffersize: int | None = ..., progress: _Progress = ...) -> MapIterator[R | BaseException]: ...
    @overload
    def map(self, environment: str, func: Callable[[A1, A2], R], iterable: _In[A1], iterable2: _In[A2], /, *,
            ordered: bool = ..., return_exceptions: Literal[True], buffersize: int | None = ...,
            progress: _Progress = ...) -> MapIterator[R | BaseException]: ...
    @overload
    def map(self, environment: str, func: Callable[..., Any], iterable: _In[Any], iterable2: _In[Any],
            iterable3: _In[Any], /, *iterables: _In[Any], ordered: bool = ..., return_exceptions: bool = ...,
            buffersize: int | None = ..., progress: _Progress = ...) -> MapIterator[Any]: ...
    def map(self, environment: str, func: Callable[..., Any], /, *iterables: _In[Any], ordered: bool = True,
            return_exceptions: bool = False, buffersize: int | None = None,
            progress: _Progress = False) -> MapIterator[Any]:
        """Run ``func`` over the items of ``iterables`` (zipped, like :func:`map`): an async iterator.

        The input (sync or async iterables, infinite ones included) is consumed lazily:
        at most ``buffersize`` results are outstanding (runs in flight plus results not yet
        yielded). Results come in input order (``ordered=True``) or as runs finish.

        Args:
            environment: where the runs go.
            func: called as ``func(*items)`` per row of the zipped iterables.
            ordered: yield in input order (default) or as completed.
            return_exceptions: yield a run's exception in its place instead of raising it
                (which closes the map, cancelling the runs in flight).
            buffersize: the bound; default the environment's ``delivery_max_in_flight``,
                else :data:`~wove.futures.DEFAULT_MAP_BUFFERSIZE` (256).
            progress: True for a progress bar on a terminal (``wove-core[progress]``;
                nothing when stderr is not a terminal), or a callable receiving a
                :class:`~wove.futures.MapProgress` as runs finish and once at the end.

        Leaving the loop early (``break``, an exception, cancellation) cancels the runs in
        flight; ``async with runtime.map(...) as results:`` (or ``await results.aclose()``)
        does so deterministically, even while you still hold the iterator.

        Raises:
            NameError: unknown environment (at the call).
            ConfigError: ``buffersize`` is not a positive integer.
            ImportError: ``progress=True`` without tqdm installed (names the extra).
        """
        if not iterables:
            raise TypeError("map() needs at least one iterable of arguments after the function.")
        return self._map(environment, func, iterables, star=False, ordered=ordered,
                         return_exceptions=return_exceptions, buffersize=buffersize, progress=progress)

    @overload
    def starmap(self, environment: str, func: Callable[..., Awaitable[R]], iterable: _In[Iterable[Any]], /, *,
                ordered: bool = ..., return_exceptions: Literal[False] = ..., buffersize: int | None = ...,
                progress: _Progress = ...) -> MapIterator[R]: ...
    @overload
    def starmap(self, environment: str, func: Callable[..., R], iterable: _In[Iterable[Any]], /, *,
                ordered: bool = ..., return_exceptions: Literal[False] = ..., buffersize: int | None = ...,
                progress: _Progress = ...) -> MapIterator[R]: ...
    @overload
    def starmap(self, environment: str, func: Callable[..., Awaitable[R]], iterable: _In[Iterable[Any]], /, *,
                ordered: bool = ..., return_exceptions: Literal[True], buffersize: int | None = ...,
                progress: _Progress = ...) -> MapIterator[R | BaseException]: ...
    @overload
    def starmap(self, environment: str, func: Callable[..., R], iterable: _In[Iterable[Any]], /, *,
                ordered: bool = ..., return_exceptions: Literal[True], buffersize: int | None = ...,
                progress: _Progress = ...) -> MapIterator[R | BaseException]: ...
    @overload
    def starmap(self, environment: str, func: Callable[..., Any], iterable: _In[Iterable[Any]], /, *,
                ordered: bool = ..., return_exceptions: bool = ..., buffersize: int | None = ...,
                progress: _Progress = ...) -> MapIterator[Any]: ...
    def starmap(self, environment: str, func: Callable[..., Any], iterable: _In[Iterable[Any]], /, *,
                ordered: bool = True, return_exceptions: bool = False, buffersize: int | None = None,
                progress: _Progress = False) -> MapIterator[Any]:
        """Like :meth:`map`, with each item of ``iterable`` the tuple of ``func``'s arguments."""
        return self._map(environment, func, (iterable,), star=True, ordered=ordered,
                         return_exceptions=return_exceptions, buffersize=buffersize, progress=progress)

    def _map(self, environment: str, func: Callable[..., Any], iterables: tuple[_In[Any], ...], *, star: bool,
             ordered: bool, return_exceptions: bool, buffersize: int | None, progress: _Progress,
             ) -> MapIterator[Any]:
        name = _task_name(func)
        env = self._environment(environment, name)
        if buffersize is None:
            configured = env.defaults.settings.get("delivery_max_in_flight")
            buffersize = configured if isinstance(configured, int) and configured > 0 else DEFAULT_MAP_BUFFERSIZE
        elif not isinstance(buffersize, int) or isinstance(buffersize, bool) or buffersize < 1:
            raise ConfigError(
                f"map of task '{name}' in environment '{environment}': buffersize must be a positive integer "
                f"(the most results outstanding at once), got {buffersize!r}. Pass buffersize=256, for example."
            )
        reporter = reporter_for(progress, f"{name} on {environment}")
        bind = _binder(func)
        loop = asyncio.get_running_loop()

        def start(row: tuple[Any, ...]) -> asyncio.Future[Any]:
            task_func, task_args = bind(row)
            env, delivery = self._prepare(environment, name, task_args, _NO_INFO)
            return loop.create_task(self._execute(env, name, task_func, task_args, delivery, self._new_run_id(name)))

        return MapIterator(start, map_source(iterables, star=star), ordered=ordered,
                           return_exceptions=return_exceptions, buffersize=buffersize, reporter=reporter)

    @overload
    def stream(self, environment: str, func: Callable[P, AsyncIterator[R]], /,
               *args: P.args, **kwargs: P.kwargs) -> RunStream[R]: ...
    @overload
    def stream(self, environment: str, func: Callable[P, Iterator[R]], /,
               *args: P.args, **kwargs: P.kwargs) -> RunStream[R]: ...
    def stream(self, environment: str, func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> RunStream[Any]:
        """Run the generator (or async generator) function ``func(*args, **kwargs)`` in
        ``environment`` and yield its items as the worker produces them::

            async for row in runtime.stream("workers", read_rows, path):
                ...

        The worker runs at most ``delivery_stream_window`` items (environment or
        run_config; default 16) ahead of the consumer. The task's error is raised after
        the items yielded before it. Leaving the loop early (``break``, an exception,
        cancellation), ``await stream.aclose()`` or leaving ``async with stream:`` sends
        ``cancel_task``; the worker closes the generator (its ``finally`` blocks run).
        ``delivery_timeout`` bounds the whole stream.

        Raises:
            NameError: unknown environment (at the call).
            StreamNotSupportedError: the environment's worker did not announce streamed
                results (a Wove 2.x worker), before anything is sent: at the call, or, for
                an executor that connects lazily (gRPC, HTTP), at ``await stream.start()``
                or the first ``async for`` step, once its first exchange told.
        """
        task_func, task_args = _keyword_call(func, args, kwargs)
        name = _task_name(func)
        env, delivery = self._prepare(environment, name, task_args, _NO_INFO)
        capabilities: frozenset[str] = getattr(env.executor, "capabilities", frozenset())
        negotiate = type(env.executor).negotiate_capabilities is not EnvironmentExecutor.negotiate_capabilities
        if CAPABILITY_TASK_YIELD not in capabilities and not negotiate:
            raise stream_not_supported(name, env.name, env.executor, capabilities)
        window = env.definition.get("delivery_stream_window") or self._run_config.get("delivery_stream_window")
        if window is None:
            window = DEFAULT_STREAM_WINDOW
        elif not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ConfigError(f"Environment '{env.name}': delivery_stream_window must be a positive integer "
                              f"(items a worker may produce ahead of the consumer), got {window!r}. "
                              "Set delivery_stream_window = 16, for example.")
        return RunStream(self, env, name, task_func, task_args, delivery, self._new_run_id(name), window)

    def _submit(self, environment: str, name: str, task_func: Any, task_args: dict[str, Any],
                info: dict[str, Any]) -> RunFuture[Any]:
        env, delivery = self._prepare(environment, name, task_args, info)
        run_id = self._new_run_id(name)
        task = asyncio.get_running_loop().create_task(
            self._execute(env, name, task_func, task_args, delivery, run_id), name=f"wove-run:{run_id}")
        return RunFuture(task, run_id, env.name, name)

    def _new_run_id(self, task_name: str) -> str:
        return f"{task_name}:{self._id_prefix}{next(self._ids):x}"

    def _environment(self, environment_name: str | None, task_name: str) -> _Environment:
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
        return env

    def _prepare(self, environment_name: str | None, task_name: str, task_args: dict[str, Any],
                 task_info: dict[str, Any]) -> tuple[_Environment, Delivery]:
        """The environment and the resolved delivery settings of one call (raises at the call)."""
        env = self._environments.get(environment_name)  # type: ignore[arg-type]
        if env is None or env.failure is not None:
            env = self._environment(environment_name, task_name)  # raises, naming the problem
        return env, env.defaults.for_call(task_name, task_args, task_info)

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
        # _prepare and _execute, written out: this is the hot path of Wove 2.x callers
        env = self._environments.get(environment_name)  # type: ignore[arg-type]
        if env is None or env.failure is not None:
            env = self._environment(environment_name, task_name)  # raises, naming the problem
        delivery = env.defaults.for_call(task_name, task_args, task_info)
        run_id = f"{task_name}:{self._id_prefix}{next(self._ids):x}"
        if (env.inline and delivery.max_in_flight is None and delivery.idempotency_key is None
                and (env.inline_sync or is_async_callable(task_func)) and not _OBSERVERS):
            return await self._run_inline(env, task_name, task_func, task_args, delivery, run_id)
        if not env.inline and delivery.max_in_flight is None and not _OBSERVERS:  # _execute's plain case
            return await self._deliver(env, task_name, task_func, task_args, delivery, run_id)
        return await self._execute(env, task_name, task_func, task_args, delivery, run_id)

    async def _execute(
        self,
        env: _Environment,
        task_name: str,
        task_func: Any,
        task_args: dict[str, Any],
        delivery: Delivery,
        run_id: str,
        observed: RunInfo | None = None,
    ) -> Any:
        if _OBSERVERS and observed is None:
            return await self._observed(env, task_name, task_func, task_args, delivery, run_id)
        limit = None
        max_in_flight = delivery.max_in_flight
        if max_in_flight is not None:
            limit = env.limits.get(max_in_flight)
            if limit is None:
                limit = env.limits[max_in_flight] = Gate(max_in_flight)
            if not limit.try_acquire():
                await limit.acquire()
        try:
            if _inline(env, delivery, task_func):
                return await self._run_inline(env, task_name, task_func, task_args, delivery, run_id)
            return await self._deliver(env, task_name, task_func, task_args, delivery, run_id, observed)
        finally:
            if limit is not None:
                limit.release()

    async def _observed(
        self,
        env: _Environment,
        task_name: str,
        task_func: Any,
        task_args: dict[str, Any],
        delivery: Delivery,
        run_id: str,
    ) -> Any:
        """:meth:`_execute` with the observers told (:mod:`wove.observe`), in the awaiting task."""
        inline = _inline(env, delivery, task_func)
        run = RunInfo(run_id, task_name, env.name, env.label, type(env.executor), inline=inline)
        observe._submitted(run)
        error: BaseException | None = None
        try:
            return await self._execute(env, task_name, task_func, task_args, delivery, run_id, run)
        except BaseException as exc:
            error = exc
            raise
        finally:
            observe._finished(run, error)

    async def _deliver(
        self,
        env: _Environment,
        task_name: str,
        task_func: Any,
        task_args: dict[str, Any],
        delivery: Delivery,
        run_id: str,
        observed: RunInfo | None = None,
    ) -> Any:
        # armed before send: a send held up by backpressure counts too
        run = Run.start(asyncio.get_running_loop(), run_id, task_name, env.name, delivery)
        env.pending[run_id] = run
        if self._debug:
            logger.debug("environment=%s run_id=%s task_id=%s: run_task", env.name, run_id, task_name)
        frame = {
            "type": "run_task",
            "run_id": run_id,
            "task_id": task_name,
            "callable": task_func,
            "args": task_args,
            "delivery": delivery.fields(),
        }
        try:
            if observed is not None:
                observe._frame_fields(observed, frame)
                await env.executor.send(frame)
                observe._call("run_sent", observed)
            else:
                await env.executor.send(frame)
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
        run_id: str,
    ) -> Any:
        task = asyncio.current_task()
        assert task is not None
        run = InlineRun(run_id, task_name, task, delivery.orphan_policy)
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
        """Take the executor's events from ``recv()`` until it fails (all of them, unless
        an :class:`_Inbox` takes them as they arrive: then only the failure)."""
        recv = env.executor.recv
        loop = asyncio.get_running_loop()
        settled = 0
        try:
            while True:
                if settled >= _SLICE:
                    settled = 0
                    await asyncio.sleep(0)
                if self._handle(env, await recv(), loop):
                    settled += 1
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._receiver_failed(env, exc)
            raise

    def _handle(self, env: _Environment, frame: dict[str, Any], loop: asyncio.AbstractEventLoop) -> bool:
        """One event of ``env``'s executor; True when it ended a run."""
        frame_type = frame.get("type")
        if frame_type == "log":
            # a run's print()/logging output goes to stderr / the logger of its name
            if "run_id" not in frame or not show_output(env.name, frame):
                logger.info("environment %s: %s", env.name, frame.get("message"))
            return False
        run = env.pending.get(frame.get("run_id"))  # type: ignore[arg-type]
        if run is None:
            if self._debug:
                logger.debug("environment=%s: %s for finished or unknown run %s",
                             env.name, frame_type, frame.get("run_id"))
            return False
        if self._debug:
            logger.debug("environment=%s run_id=%s task_id=%s: %s", env.name, run.run_id, run.task_id, frame_type)
        if frame_type in TERMINAL_EVENTS:  # the usual event first
            if run.ack is not None and not run.ack.done():
                run.ack.set_result(frame_type)
            if frame_type == "task_result":
                run.settle(result=frame.get("result"))
            elif frame_type == "task_cancelled":
                run.settle(cancelled=True)
            else:
                run.settle(error=_exception_from_error(frame, env.name))
            return True
        if frame_type == "task_started" or frame_type == "heartbeat":
            run.seen(loop)
            if _OBSERVERS:
                observe._event(run.run_id, frame_type)
            return False
        if frame_type == "task_yield":  # an item of a streamed run (runtime.stream)
            run.seen(loop)
            stream = env.streams.get(run.run_id)
            if stream is not None:
                stream.push(frame.get("seq"), frame.get("item"))
            return False
        run.settle(error=RuntimeError(
            f"Unknown executor frame type {frame_type!r} from environment '{env.name}' for run {run.run_id}."
        ))
        return False

    def _receiver_failed(self, env: _Environment, exc: BaseException) -> None:
        """``env``'s executor stopped delivering events: every pending run fails with ``exc``."""
        env.failure = exc
        executor_name = type(env.executor).__name__
        logger.error("environment %s: executor %s stopped delivering events: %r", env.name, executor_name, exc)
        for run in list(env.pending.values()):
            run.settle(error=lost_error(run, env.name, executor_name, exc))


class _Inbox:
    """The events a :class:`~wove.transport.FrameExecutor` hands over as they arrive
    (:meth:`~wove.transport.FrameExecutor.deliver_events_to`), handled at once: no queue
    and no wake-up of a receiving task in between. As the receiving task does, it ends at
    most :data:`_SLICE` runs per loop turn and keeps the rest, in order, for the next."""

    __slots__ = ("_backlog", "_env", "_loop", "_runtime", "_scheduled", "_settled")

    def __init__(self, runtime: ExecutorRuntime, env: _Environment, loop: asyncio.AbstractEventLoop) -> None:
        self._runtime = runtime
        self._env = env
        self._loop = loop
        self._backlog: collections.deque[dict[str, Any]] = collections.deque()
        self._settled = 0
        self._scheduled = False

    def __call__(self, event: dict[str, Any]) -> None:
        if self._backlog or self._settled >= _SLICE:
            self._backlog.append(event)
            self._schedule()
        else:
            self._take(event)

    def _take(self, event: dict[str, Any]) -> None:
        env = self._env
        if env.failure is not None:
            return  # its runs were failed with it
        try:
            if self._runtime._handle(env, event, self._loop):
                self._settled += 1
                self._schedule()  # the count starts again on the next turn
        except Exception as exc:  # as the receiving task would: the environment fails
            self._runtime._receiver_failed(env, exc)

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._turn)

    def _turn(self) -> None:
        self._scheduled = False
        self._settled = 0
        backlog = self._backlog
        while backlog and self._settled < _SLICE:
            self._take(backlog.popleft())
        if backlog:
            self._schedule()


#: runs an environment's receiver settles before it lets the loop run their callers: a
#: batch of hundreds resumed in one iteration makes each ``asyncio.Semaphore`` release in
#: those callers scan past every waiter woken before it (quadratic in the batch)
_SLICE = 32


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


def _executor_label(definition: dict[str, Any], executor: EnvironmentExecutor) -> str:
    """The executor's name for observers: the definition's name for it, else its own."""
    value = definition.get("executor")
    if isinstance(value, str):
        return value
    name = getattr(executor, "executor_name", None)
    if isinstance(name, str) and name and name != "executor":
        return name
    return type(executor).__name__


def _exception_from_error(frame: dict[str, Any], environment: str) -> BaseException:
    """The task's own exception with the worker's traceback as ``__cause__``, else
    EnvironmentExecutionError (see :func:`wove.delivery.task_exception`)."""
    return task_exception(frame, environment)


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


def _inline(env: _Environment, delivery: Delivery, task_func: Any) -> bool:
    """True when the call runs through the executor's ``run_inline`` (not as frames).

    A sync call goes inline only while no observer is installed: observed, it travels as
    a frame, so the worker engine reports its execution (``execution_started``, in the
    thread's context) as it does on every other executor."""
    return (env.inline and delivery.idempotency_key is None
            and (is_async_callable(task_func) or (env.inline_sync and not _OBSERVERS)))


def _inline_without_limit(env: _Environment, delivery: Delivery, task_func: Any) -> bool:
    """True when :meth:`ExecutorRuntime._execute` would await the call inline with no gate."""
    return delivery.max_in_flight is None and _inline(env, delivery, task_func)


def _task_name(func: Any) -> str:
    return getattr(func, "__name__", None) or type(func).__name__


def _binder(func: Callable[..., Any]) -> Callable[[tuple[Any, ...]], tuple[Callable[..., Any], dict[str, Any]]]:
    """``_keyword_call`` for many rows of positional arguments, the signature read once."""
    try:
        parameters = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):
        parameters = []
    names: list[str] = []
    for parameter in parameters:
        if parameter.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD:
            break
        names.append(parameter.name)
    width = len(names)

    def bind(row: tuple[Any, ...]) -> tuple[Callable[..., Any], dict[str, Any]]:
        if len(row) <= width:
            return func, dict(zip(names, row))
        return _keyword_call(func, row, {})

    return bind


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


#: call_with / submit_with keyword -> (check, what it must be, an example)
_CALL_SETTINGS: dict[str, tuple[Callable[[Any], bool], str, str]] = {
    "delivery_timeout": (_positive_number, "a positive number of seconds", "delivery_timeout=30"),
    "delivery_heartbeat_seconds": (_positive_number, "a positive number of seconds", "delivery_heartbeat_seconds=10"),
    "delivery_cancel_mode": (lambda v: v in CANCEL_MODES, f"one of {', '.join(map(repr, CANCEL_MODES))}",
                             'delivery_cancel_mode="require_ack"'),
    "delivery_orphan_policy": (lambda v: v in ORPHAN_POLICIES, f"one of {', '.join(map(repr, ORPHAN_POLICIES))}",
                               'delivery_orphan_policy="requeue"'),
    "delivery_max_in_flight": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
                               "a positive integer", "delivery_max_in_flight=64"),
    "delivery_idempotency_key": (lambda v: isinstance(v, str) or callable(v),
                                 "a string, a format string over the task's arguments, or a callable",
                                 'delivery_idempotency_key="report-{day}"'),
}


def _call_settings(environment: str, func: Any, task_name: str | None, given: dict[str, Any],
                   unknown: dict[str, Any]) -> dict[str, Any]:
    """The ``task_info`` of a ``call_with``/``submit_with``: its delivery keywords, checked.

    Raises:
        ConfigError: an unknown keyword (with did-you-mean) or a value of the wrong type.
    """
    where = f"call_with(...) of task '{task_name or _task_name(func)}' in environment '{environment}'"
    if unknown:
        key = sorted(unknown)[0]
        close = difflib.get_close_matches(key, [*DELIVERY_KEYS, "task_name"], n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        raise ConfigError(
            f"{where}: unknown keyword {key}={unknown[key]!r}.{hint} The keywords are task_name and the "
            f"delivery settings {', '.join(DELIVERY_KEYS)}; the task's own arguments go in args and kwargs."
        )
    info: dict[str, Any] = {"environment": environment}
    for key in DELIVERY_KEYS:
        value = given.get(key)
        if value is None:
            continue
        check, expected, example = _CALL_SETTINGS[key]
        if not check(value):
            raise ConfigError(f"{where}: {key} must be {expected}, got {value!r} "
                              f"({type(value).__name__}). Pass {example}, for example, or leave it out.")
        info[key] = value
    return info
