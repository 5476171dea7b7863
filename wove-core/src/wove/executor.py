"""The executor contract: four async methods over frames."""

from __future__ import annotations

import abc
from typing import Any

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
    """

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
