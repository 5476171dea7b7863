"""Shared machinery for executors that move frames over a transport.

:class:`FrameExecutor` keeps the event queue behind ``recv()``, tracks the runs in flight
and decides, when the transport loses a run (a worker died, a connection dropped, a
request failed), whether it is delivered again (orphan policy ``requeue``) or ends with a
``task_error`` whose source is ``transport``. Every transport uses it, so they all follow
one re-delivery policy (:class:`RedeliveryPolicy`, ``docs/runtime.md``, "Re-delivery"):

* ``max_deliveries`` (default 3): a ``requeue`` run is transmitted to a worker at most
  this many times (the first delivery plus re-deliveries);
* ``reconnect_initial_delay`` (0.1 s) and ``reconnect_max_delay`` (5 s): the back-off
  before each re-delivery or reconnection attempt, exponential with jitter;
* ``reconnect_timeout`` (30 s): how long a ``requeue`` run waits for an unreachable worker
  to come back before it fails with an error that says so. Attempts that could not reach a
  worker are not deliveries.

Older keys keep working as aliases: ``retry_backoff`` (HTTP) for
``reconnect_initial_delay``, ``ready_timeout`` (gRPC) for ``reconnect_timeout``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import observe
from .errors import PayloadTooLargeError
from .executor import EnvironmentExecutor
from .observe import _OBSERVERS
from .options import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_PAYLOAD_WARNING_BYTES
from .protocol import TERMINAL_EVENTS, error_event, transport_error_event

__all__ = [
    "DEFAULT_MAX_DELIVERIES",
    "DEFAULT_RECONNECT_INITIAL_DELAY",
    "DEFAULT_RECONNECT_MAX_DELAY",
    "DEFAULT_RECONNECT_TIMEOUT",
    "REDELIVERY_ALIASES",
    "REDELIVERY_CONFIG_KEYS",
    "FrameExecutor",
    "InFlight",
    "PayloadPolicy",
    "RedeliveryPolicy",
    "format_size",
]

logger = logging.getLogger(__name__)

#: Deliveries of one run (the first plus re-deliveries) under orphan policy ``requeue``.
DEFAULT_MAX_DELIVERIES = 3
#: Seconds a ``requeue`` run waits for an unreachable worker to come back.
DEFAULT_RECONNECT_TIMEOUT = 30.0
#: First back-off (seconds) before a re-delivery or reconnection attempt; it doubles.
DEFAULT_RECONNECT_INITIAL_DELAY = 0.1
#: Largest back-off (seconds).
DEFAULT_RECONNECT_MAX_DELAY = 5.0
_MIN_DELAY = 0.01
#: The ``executor_config`` keys of the re-delivery policy, on every transport.
REDELIVERY_CONFIG_KEYS = frozenset({
    "max_deliveries", "reconnect_timeout", "reconnect_initial_delay", "reconnect_max_delay",
})
#: Older spellings still accepted: alias -> key.
REDELIVERY_ALIASES: Mapping[str, str] = {
    "retry_backoff": "reconnect_initial_delay",
    "ready_timeout": "reconnect_timeout",
}


@dataclass(frozen=True)
class RedeliveryPolicy:
    """What a transport does with a ``requeue`` run it lost (see the module docstring).

    Attributes:
        max_deliveries: transmissions of one run to a worker, at most.
        reconnect_timeout: seconds to wait for an unreachable worker to come back.
        initial_delay: first back-off in seconds (``reconnect_initial_delay``).
        max_delay: largest back-off in seconds (``reconnect_max_delay``).
    """

    max_deliveries: int = DEFAULT_MAX_DELIVERIES
    reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT
    initial_delay: float = DEFAULT_RECONNECT_INITIAL_DELAY
    max_delay: float = DEFAULT_RECONNECT_MAX_DELAY

    @classmethod
    def from_config(cls, config: Mapping[str, Any], where: str = "executor_config") -> RedeliveryPolicy:
        """Read the policy from ``executor_config`` (aliases included).

        Raises:
            ValueError: a value is not a positive integer / non-negative number of
                seconds, or a key and its alias are both set (the message names them).
        """
        values: dict[str, Any] = {}
        for key in REDELIVERY_CONFIG_KEYS:
            if key in config:
                values[key] = (key, config[key])
        for alias, key in REDELIVERY_ALIASES.items():
            if alias in config:
                if key in values:
                    raise ValueError(f"{where}: executor_config sets both {key} and its older alias {alias}; "
                                     f"keep only {key}.")
                values[key] = (alias, config[alias])
        max_deliveries = DEFAULT_MAX_DELIVERIES
        if "max_deliveries" in values:
            name, value = values["max_deliveries"]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{where}: executor_config.{name} must be a positive integer, got {value!r}.")
            max_deliveries = value

        def seconds(key: str, default: float, *, none_is_zero: bool = False) -> float:
            if key not in values:
                return default
            name, value = values[key]
            if value is None and none_is_zero:
                return 0.0
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                    or value < 0):
                raise ValueError(f"{where}: executor_config.{name} must be a non-negative number of seconds, "
                                 f"got {value!r}.")
            return float(value)

        return cls(
            max_deliveries=max_deliveries,
            reconnect_timeout=seconds("reconnect_timeout", DEFAULT_RECONNECT_TIMEOUT),
            initial_delay=seconds("reconnect_initial_delay", DEFAULT_RECONNECT_INITIAL_DELAY, none_is_zero=True),
            max_delay=seconds("reconnect_max_delay", DEFAULT_RECONNECT_MAX_DELAY, none_is_zero=True),
        )

    def delay(self, attempt: int) -> float:
        """Back-off before attempt number ``attempt`` (1-based) of a re-delivery or
        reconnection: ``min(max_delay, initial_delay * 2 ** (attempt - 1))`` scaled by a
        random factor in [0.5, 1] (jitter, so many clients do not retry in step), and at
        least 10 ms (never a busy loop)."""
        base = min(self.max_delay, self.initial_delay * 2.0 ** min(max(attempt - 1, 0), 60))
        return max(base * random.uniform(0.5, 1.0), _MIN_DELAY)


def format_size(size: int) -> str:
    """``size`` bytes for a message: ``"100.0 MiB (104857600 bytes)"``."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit} ({size} bytes)"
    return f"{size} bytes"


@dataclass(frozen=True)
class PayloadPolicy:
    """How large a command may be, and above which size a payload is worth a warning.

    Attributes:
        max_bytes: the largest command the transport sends (``max_message_bytes``).
        setting: what raises the limit, for the error (``executor_config.max_message_bytes``).
        warning_bytes: commands and results above this log a warning (None: never).
    """

    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    setting: str = "executor_config.max_message_bytes"
    warning_bytes: int | None = DEFAULT_PAYLOAD_WARNING_BYTES
    #: commands up to this size are neither refused nor warned about
    quiet_bytes: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        quiet = self.max_bytes if self.warning_bytes is None else min(self.max_bytes, self.warning_bytes)
        object.__setattr__(self, "quiet_bytes", quiet)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, setting: str = "executor_config.max_message_bytes",
                    max_bytes: int | None = None) -> PayloadPolicy:
        """The policy of a validated ``executor_config`` holding the keys of
        :data:`wove.options.PAYLOAD_OPTIONS` (``max_bytes`` overrides its limit: a
        transport whose own setting is the limit, named by ``setting``)."""
        warning = config.get("payload_warning_bytes", DEFAULT_PAYLOAD_WARNING_BYTES)
        limit = max_bytes if max_bytes is not None else config.get("max_message_bytes") or DEFAULT_MAX_MESSAGE_BYTES
        return cls(max_bytes=int(limit), setting=setting, warning_bytes=None if warning is False else warning)

    def check(self, frame: Mapping[str, Any], size: int, *, environment: str, executor: str) -> None:
        """Before a command of ``size`` bytes is sent: refuse it over the limit, warn above
        the warning size.

        Raises:
            PayloadTooLargeError: ``size`` is over :attr:`max_bytes`; the message names the
                task, the size, the limit and :attr:`setting`.
        """
        if size > self.max_bytes:
            raise PayloadTooLargeError(
                f"Environment '{environment}': the {frame.get('type', 'command')} of task "
                f"'{frame.get('task_id', '?')}' (run {frame.get('run_id', '?')}) is {format_size(size)}, over the "
                f"{executor} limit of {format_size(self.max_bytes)}; nothing was sent. Raise {self.setting} "
                "(and the worker's --max-body-bytes), or pass the task a path or URL to the data instead.",
                size=size, limit=self.max_bytes, setting=self.setting)
        self.warn(frame, size, environment=environment, what="arguments")

    def warn(self, frame: Mapping[str, Any], size: int, *, environment: str, what: str = "result") -> None:
        """Log one warning when ``size`` is above :attr:`warning_bytes`."""
        if self.warning_bytes is not None and size > self.warning_bytes:
            logger.warning(
                "Environment '%s': task '%s' (run %s) moves %s of %s, above payload_warning_bytes=%d; large "
                "payloads cost memory on both sides and time on the wire (pass a path or URL instead, or raise "
                "executor_config.payload_warning_bytes to silence this).", environment, frame.get("task_id", "?"),
                frame.get("run_id", "?"), what, format_size(size), self.warning_bytes)


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

    Subclasses call :meth:`_open_events` in ``start()`` (it reads the re-delivery policy,
    :class:`RedeliveryPolicy`, from ``executor_config``), :meth:`_track` before they
    transmit a ``run_task``, :meth:`_emit` for every event they receive, :meth:`_lost`
    when the transport loses a run and :meth:`_unreachable` when a delivery could not
    reach a worker at all. Their ``executor_config`` keys include
    :data:`REDELIVERY_CONFIG_KEYS`.
    """

    executor_name = "executor"
    #: where events go instead of the queue behind ``recv()`` (:meth:`deliver_events_to`)
    _sink: Callable[[dict[str, Any]], None] | None = None

    def __init__(self) -> None:
        self._events: asyncio.Queue[dict[str, Any] | BaseException] | None = None
        self._inflight: dict[str, InFlight] = {}
        self._redelivery = RedeliveryPolicy()
        self._max_deliveries = DEFAULT_MAX_DELIVERIES
        self._environment = "?"
        #: command size limit and warning size (transports set theirs in ``start()``)
        self._payload = PayloadPolicy()

    def _open_events(self, environment_name: str, config: dict[str, Any]) -> None:
        self._environment = environment_name
        self._payload = PayloadPolicy.from_config(config)
        self._redelivery = RedeliveryPolicy.from_config(config, f"Environment '{environment_name}'")
        self._max_deliveries = self._redelivery.max_deliveries
        self._events = asyncio.Queue()
        self._inflight = {}

    def _require_started(self) -> asyncio.Queue[dict[str, Any] | BaseException]:
        if self._events is None:
            raise RuntimeError(f"{self.executor_name} executor for environment '{self._environment}' is not started.")
        return self._events

    async def recv(self) -> dict[str, Any]:
        item = await self._require_started().get()
        if isinstance(item, BaseException):
            raise item
        return item

    def deliver_events_to(self, sink: Callable[[dict[str, Any]], None] | None) -> None:
        """Hand each event to ``sink`` as it arrives, instead of queueing it for ``recv()``
        (``None``: queue again). The runtime attaches one after ``start()``: an event then
        costs no queue and no wake-up of a receiving task. Events already queued go to
        ``sink`` first, in order; a failure (what makes ``recv()`` raise) still goes
        through ``recv()``. ``sink`` runs on the event loop, inside the transport's own
        callbacks: it must not block or raise.
        """
        self._sink = sink
        queue = self._events
        if sink is None or queue is None:
            return
        queued = [queue.get_nowait() for _ in range(queue.qsize())]
        for index, item in enumerate(queued):
            if isinstance(item, BaseException):  # recv() still raises it, then gives what followed
                for rest in queued[index:]:
                    queue.put_nowait(rest)
                return
            sink(item)

    def _track(self, frame: dict[str, Any], size: int | None = None) -> InFlight:
        """Record a run_task about to be transmitted; counts the delivery.

        ``size`` (bytes of the encoded command, when known) is reported to observers
        (:mod:`wove.observe`, ``RunInfo.request_size``).
        """
        entry = self._inflight.get(frame["run_id"])
        if entry is None:
            entry = self._inflight[frame["run_id"]] = InFlight(frame)
        entry.deliveries += 1
        if _OBSERVERS:
            observe._transmitted(entry.run_id, entry.deliveries, size)
        return entry

    def _check_payload(self, frame: dict[str, Any], size: int) -> None:
        """Before sending a ``run_task`` of ``size`` bytes (:meth:`PayloadPolicy.check`).

        Raises:
            PayloadTooLargeError: over the transport's limit.
        """
        payload = self._payload
        if size <= payload.quiet_bytes:  # the usual command: under both sizes
            return
        payload.check(frame, size, environment=self._environment, executor=self.executor_name)

    def _warn_received(self, events: list[dict[str, Any]], size: int) -> None:
        """After a message of ``size`` bytes arrived: one warning when it is above
        ``payload_warning_bytes``, naming the run whose result or streamed item it carries
        (else its terminal event's, else any run's). Cheap for small messages."""
        limit = self._payload.warning_bytes
        if limit is None or size <= limit:
            return
        named = [event for event in events if "run_id" in event]
        if not named:
            return
        event = next((e for e in named if "result" in e or "item" in e), None) or next(
            (e for e in named if e.get("type") in TERMINAL_EVENTS), named[0])
        self._payload.warn(event, size, environment=self._environment,
                           what="a streamed item" if "item" in event else "result")

    def _emit(self, event: dict[str, Any]) -> None:
        """Pass an event to the runtime; a terminal event ends the run's tracking."""
        if self._events is None:
            return
        if event.get("type") in TERMINAL_EVENTS and self._inflight.pop(str(event.get("run_id")), None) is None:
            # a second terminal after a re-delivery (the first delivery finished after all)
            logger.debug("%s: dropping duplicate %s for run %s", self.executor_name, event.get("type"), event.get("run_id"))
            return
        sink = self._sink
        if sink is not None:
            sink(event)
        else:
            self._events.put_nowait(event)

    def _error(self, entry: InFlight, reason: str, exc: BaseException | None, kind: str | None) -> None:
        if kind is None:
            event = transport_error_event(entry.frame, reason, exc)
        else:
            event = error_event(entry.run_id, str(entry.frame.get("task_id")), kind=kind, message=reason,
                                source="transport", retryable=True, exc=exc)
        self._emit(event)

    def _lost(self, run_id: str, reason: str, exc: BaseException | None = None, *, redeliverable: bool = True,
              kind: str | None = None) -> bool:
        """The transport lost ``run_id`` before its terminal event.

        Returns True when the caller should deliver it again (policy ``requeue`` with
        deliveries left and ``redeliverable``) after :meth:`_redelivery_delay`; otherwise
        emits a ``task_error`` (source ``transport``, ``kind`` or the exception's type
        name) with ``reason`` and returns False.
        """
        entry = self._inflight.get(run_id)
        if entry is None:
            return False
        limit = self._redelivery.max_deliveries
        if entry.policy == "requeue" and redeliverable and entry.deliveries < limit:
            logger.warning("%s: environment %s lost run %s (%s); re-delivering (delivery %d of %d)",
                           self.executor_name, self._environment, run_id, reason, entry.deliveries + 1, limit)
            if _OBSERVERS:
                observe._redelivered(run_id, reason)
            return True
        if entry.policy == "requeue" and entry.deliveries >= limit:
            reason = f"{reason} Gave up after {entry.deliveries} deliveries (executor_config.max_deliveries={limit})."
        self._error(entry, reason, exc, kind)
        return False

    def _redelivery_delay(self, run_id: str) -> float:
        """Seconds to wait before delivering ``run_id`` again (the policy's back-off)."""
        entry = self._inflight.get(run_id)
        return self._redelivery.delay(entry.deliveries if entry is not None else 1)

    def _unreachable(self, run_id: str, reason: str, exc: BaseException | None = None, *, since: float,
                     attempt: int, kind: str | None = None) -> float | None:
        """A delivery of ``run_id`` could not reach a worker (nothing ran).

        The attempt is not counted as a delivery. For policy ``requeue``, returns the
        seconds to wait before the next attempt while the outage (which began at
        ``since``, loop time) is shorter than ``reconnect_timeout``; ``attempt`` is the
        number of consecutive unreachable attempts. Otherwise emits a ``task_error``
        (source ``transport``) and returns None.
        """
        entry = self._inflight.get(run_id)
        if entry is None:
            return None
        entry.deliveries = max(entry.deliveries - 1, 0)
        if entry.policy != "requeue":
            self._error(entry, reason, exc, kind)
            return None
        timeout = self._redelivery.reconnect_timeout
        remaining = since + timeout - asyncio.get_running_loop().time()
        if remaining <= 0:
            self._error(entry, f"{reason} The worker did not come back within executor_config.reconnect_timeout="
                               f"{timeout:g}s (delivery_orphan_policy='requeue'); start the worker service, or "
                               "raise reconnect_timeout to wait longer.", exc, kind)
            return None
        wait = min(self._redelivery.delay(attempt), remaining)
        logger.info("%s: environment %s cannot reach a worker for run %s (%s); trying again in %.2fs",
                    self.executor_name, self._environment, run_id, reason, wait)
        return wait

    def _fail(self, exc: BaseException) -> None:
        """Make ``recv()`` raise ``exc``: the runtime fails every pending run with it."""
        if self._events is not None:
            self._events.put_nowait(exc)
