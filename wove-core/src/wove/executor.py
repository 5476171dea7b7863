"""The executor contract: four async methods over frames, and two optional capabilities."""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from .options import OptionSpec

__all__ = ["EnvironmentExecutor"]


class EnvironmentExecutor(abc.ABC):
    """CGI-like stream transport contract for environment executors.

    The runtime calls :meth:`start` once, then :meth:`send` command frames
    (``run_task``, ``cancel_task``, ``shutdown``) from many tasks while one loop awaits
    :meth:`recv` for event frames, and finally :meth:`stop`. An executor must produce
    exactly one terminal event (``task_result``, ``task_error`` or ``task_cancelled``)
    for every ``run_task`` it accepted; when its transport fails it reports a
    ``task_error`` with ``source="transport"`` for the runs it lost (or re-delivers
    them when their orphan policy is ``requeue``). If :meth:`recv` raises, the runtime
    fails every pending run of the environment with that cause.

    Optional capabilities (class attributes; the defaults mean "not offered"):

    ``runs_inline``
        True when the executor runs tasks in this process and implements
        :meth:`run_inline`. The runtime then awaits an async callable that has no
        ``delivery_idempotency_key`` directly in the caller's task through
        ``run_inline(func, args)`` instead of sending ``run_task`` and waiting for its
        terminal event (timeouts, cancellation and orphan policies still apply, enforced
        by the runtime). Calls with a key still go through frames, and so do sync
        callables unless the executor also sets ``runs_sync_inline``.
        :meth:`~wove.runtime.ExecutorRuntime.is_local_environment` reports it.
    ``runs_sync_inline``
        With ``runs_inline``: :meth:`run_inline` also takes sync callables, and runs them
        without blocking the event loop (the local executor hands them to its thread
        pool and awaits the result there).
    ``config_options``
        the executor's :class:`~wove.options.OptionSpec` (the keys of its
        ``executor_config``), when it declares one. The executor itself validates its
        config with it first thing in :meth:`start` (so an executor used without the
        runtime is checked too). The runtime reads it for the definition-level
        ``max_workers``, which reaches only an executor whose spec has that key.
    ``capabilities``
        the wire extensions this executor's worker has announced, as a frozenset of
        names (default empty: a Wove 2.x peer). The runtime reads it after :meth:`start`
        and before each run that needs one; ``"task_yield"``
        (:data:`wove.protocol.CAPABILITY_TASK_YIELD`) means streamed generator results:
        :meth:`send` accepts ``stream_credit`` commands and :meth:`recv` may return
        ``task_yield`` events (``runtime.stream``; docs/wire.md). An executor learns it
        from its worker (a ready line, a header, metadata) and must not claim it for a
        peer that did not announce it. An executor that connects lazily (so it cannot know
        before its first exchange) overrides :meth:`negotiate_capabilities`.
    """

    #: The executor implements :meth:`run_inline` (see the class docstring).
    runs_inline: ClassVar[bool] = False
    #: :meth:`run_inline` also takes sync callables (see the class docstring).
    runs_sync_inline: ClassVar[bool] = False
    #: The ``executor_config`` spec (see :mod:`wove.options`), or None.
    config_options: ClassVar[OptionSpec | None] = None
    #: Wire extensions the worker announced (see the class docstring); empty by default.
    capabilities: frozenset[str] = frozenset()

    @abc.abstractmethod
    async def start(
        self,
        *,
        environment_name: str,
        environment_config: dict[str, Any],
        run_config: dict[str, Any],
    ) -> None:
        """Initialize a run/session for this executor."""

    @abc.abstractmethod
    async def send(self, frame: dict[str, Any]) -> None:
        """Send one command frame."""

    @abc.abstractmethod
    async def recv(self) -> dict[str, Any]:
        """Receive one event frame."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop the executor session and clean up resources."""

    async def negotiate_capabilities(self) -> frozenset[str]:
        """Ask the worker what it speaks, when :attr:`capabilities` cannot say yet (a lazy
        connection); return the (now known) capabilities. The runtime awaits it before the
        first run that needs a capability the executor has not announced, and before
        sending anything. The default returns :attr:`capabilities`: what is known is all."""
        return self.capabilities

    async def run_inline(self, func: Any, args: dict[str, Any]) -> Any:
        """Await ``func(**args)`` in the calling task and return its result.

        Called by the runtime only when :attr:`runs_inline` is true, for async callables
        (and for sync callables too when :attr:`runs_sync_inline` is true).
        The task's own exception propagates; cancelling the calling task cancels the run.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not run calls inline; it sets runs_inline = "
            f"{self.runs_inline!r}. Set runs_inline = True only with a run_inline() of its own."
        )
