"""Shared machinery for executors that move frames over a transport.

:class:`FrameExecutor` keeps the event queue behind ``recv()``, tracks the runs in flight
and decides, when the transport loses a run (a worker died, a connection dropped, a
request failed), whether it is delivered again (orphan policy ``requeue``, bounded
attempts) or ends with a ``task_error`` whose source is ``transport``. Every transport
uses it, so they all behave the same way.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from .executor import EnvironmentExecutor
from .protocol import TERMINAL_EVENTS, transport_error_event

__all__ = ["DEFAULT_MAX_DELIVERIES", "FrameExecutor", "InFlight"]

logger = logging.getLogger(__name__)

#: Deliveries of one run (the first plus re-deliveries) under orphan policy ``requeue``.
DEFAULT_MAX_DELIVERIES = 3


@dataclass(eq=False)
class InFlight:
    """A run_task frame that has no terminal event yet."""

    frame: dict[str, Any]
    deliveries: int = 0

    @property
    def run_id(self) -> str:
        return str(self.frame["run_id"])

    @property
    def policy(self) -> str:
        return str((self.frame.get("delivery") or {}).get("delivery_orphan_policy") or "cancel")


class FrameExecutor(EnvironmentExecutor):
    """Base class: event queue, in-flight tracking, re-delivery decisions.

    Subclasses call :meth:`_open_events` in ``start()``, :meth:`_track` before they
    transmit a ``run_task``, :meth:`_emit` for every event they receive, and
    :meth:`_lost` when the transport loses a run. ``executor_config.max_deliveries``
    (default 3) bounds deliveries of a ``requeue`` run.
    """

    executor_name = "executor"

    def __init__(self) -> None:
        self._events: asyncio.Queue[dict[str, Any] | BaseException] | None = None
        self._inflight: dict[str, InFlight] = {}
        self._max_deliveries = DEFAULT_MAX_DELIVERIES
        self._environment = "?"

    def _open_events(self, environment_name: str, config: dict[str, Any]) -> None:
        self._environment = environment_name
        self._events = asyncio.Queue()
        self._inflight = {}
        value = config.get("max_deliveries", DEFAULT_MAX_DELIVERIES)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(
                f"Environment '{environment_name}': executor_config.max_deliveries must be a "
                f"positive integer, got {value!r}."
            )
        self._max_deliveries = value

    def _require_started(self) -> asyncio.Queue[dict[str, Any] | BaseException]:
        if self._events is None:
            raise RuntimeError(f"{self.executor_name} executor for environment '{self._environment}' is not started.")
        return self._events

    async def recv(self) -> dict[str, Any]:
        item = await self._require_started().get()
        if isinstance(item, BaseException):
            raise item
        return item

    def _track(self, frame: dict[str, Any]) -> InFlight:
        """Record a run_task about to be transmitted; counts the delivery."""
        entry = self._inflight.get(frame["run_id"])
        if entry is None:
            entry = self._inflight[frame["run_id"]] = InFlight(frame)
        entry.deliveries += 1
        return entry

    def _emit(self, event: dict[str, Any]) -> None:
        """Pass an event to the runtime; a terminal event ends the run's tracking."""
        if self._events is None:
            return
        if event.get("type") in TERMINAL_EVENTS and self._inflight.pop(str(event.get("run_id")), None) is None:
            # a second terminal after a re-delivery (the first delivery finished after all)
            logger.debug("%s: dropping duplicate %s for run %s", self.executor_name, event.get("type"), event.get("run_id"))
            return
        self._events.put_nowait(event)

    def _lost(self, run_id: str, reason: str, exc: BaseException | None = None, *, redeliverable: bool = True) -> bool:
        """The transport lost ``run_id`` before its terminal event.

        Returns True when the caller should deliver it again (policy ``requeue`` with
        deliveries left and ``redeliverable``); otherwise emits a ``task_error`` (source
        ``transport``) with ``reason`` and returns False.
        """
        entry = self._inflight.get(run_id)
        if entry is None:
            return False
        if entry.policy == "requeue" and redeliverable and entry.deliveries < self._max_deliveries:
            logger.warning("%s: environment %s lost run %s (%s); re-delivering (delivery %d of %d)",
                           self.executor_name, self._environment, run_id, reason,
                           entry.deliveries + 1, self._max_deliveries)
            return True
        if entry.policy == "requeue" and entry.deliveries >= self._max_deliveries:
            reason = f"{reason} Gave up after {entry.deliveries} deliveries (executor_config.max_deliveries={self._max_deliveries})."
        self._emit(transport_error_event(entry.frame, reason, exc))
        return False

    def _fail(self, exc: BaseException) -> None:
        """Make ``recv()`` raise ``exc``: the runtime fails every pending run with it."""
        if self._events is not None:
            self._events.put_nowait(exc)
