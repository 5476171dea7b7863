"""Exceptions raised by Wove.

Hierarchy::

    RuntimeError
    ├── MissingDispatchFeatureError   cloudpickle is needed and not installed
    ├── EnvironmentExecutionError     an executor reported a normalized error payload
    ├── DeliveryTimeoutError          delivery_timeout or heartbeat window expired (also a TimeoutError)
    └── DeliveryOrphanedError         work orphaned by shutdown or a lost worker
    ValueError
    ├── ProtocolError                 bytes or frames that break the wire format
    └── ConfigError                   bad environment / executor configuration
    TypeError
    └── DispatchError                 a task's callable or argument cannot be pickled
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ConfigError",
    "DeliveryOrphanedError",
    "DeliveryTimeoutError",
    "DispatchError",
    "EnvironmentExecutionError",
    "MissingDispatchFeatureError",
    "ProtocolError",
]

DISPATCH_INSTALL = 'pip install "wove-core[dispatch]"'


class MissingDispatchFeatureError(RuntimeError):
    """Raised by dispatch-only executors when cloudpickle is not installed."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(
            "Wove dispatch features require cloudpickle, which is not installed.\n\n"
            f"Install with: {DISPATCH_INSTALL}\n\n"
            f"Required because: {reason}"
        )


class EnvironmentExecutionError(RuntimeError):
    """Error raised when an executor reports a normalized error payload.

    ``payload`` holds ``kind``, ``message``, ``traceback``, ``retryable`` and
    ``source`` (``task``, ``executor``, ``transport`` or ``config``).
    """

    def __init__(self, payload: dict[str, Any]) -> None:
        self.payload = payload
        message = str(payload.get("message") or "Task execution failed.")
        kind = payload.get("kind")
        source = payload.get("source")
        if kind and source and source != "task":
            message = f"{message} [{source} error: {kind}]"
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.payload,))


class DeliveryTimeoutError(RuntimeError, TimeoutError):
    """Raised when delivery does not complete within delivery_timeout or the heartbeat window.

    Also a :class:`TimeoutError` (so ``except TimeoutError`` and, on Python 3.11+,
    ``except asyncio.TimeoutError`` catch it).
    """


class DeliveryOrphanedError(RuntimeError):
    """Raised when a run becomes orphaned during runtime shutdown or failure handling."""


class ProtocolError(ValueError):
    """Raised by the wire codec for bytes or frames that break the wire format."""


class ConfigError(ValueError):
    """Raised for invalid environment or executor configuration."""


class DispatchError(TypeError):
    """Raised when a task's callable or arguments cannot be pickled for another process."""
