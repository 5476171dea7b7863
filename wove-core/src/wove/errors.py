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
        └── PayloadTooLargeError      a command is over the transport's size limit
    Exception
    └── RemoteTraceback               the worker's traceback, as a remote error's __cause__
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
    "PayloadTooLargeError",
    "ProtocolError",
    "RemoteTraceback",
    "StreamNotSupportedError",
    "exception_chain",
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
    ``source`` (``task``, ``executor``, ``transport`` or ``config``), and from a Wove 3
    worker ``host`` and ``pid``. For a task's own exception that could not be rebuilt on
    the caller, the message is ``"<kind>: <message>"`` and :attr:`traceback` is the
    worker's traceback text.
    """

    def __init__(self, payload: dict[str, Any]) -> None:
        self.payload = payload
        message = str(payload.get("message") or "Task execution failed.")
        kind = payload.get("kind")
        source = payload.get("source")
        if kind and source and source != "task":
            message = f"{message} [{source} error: {kind}]"
        elif kind and source == "task" and not message.startswith(f"{kind}:"):
            message = f"{kind}: {message}"
        #: the remote exception's class name (``kind``)
        self.kind = str(kind) if kind else None
        #: the formatted traceback the worker sent ("" when it sent none)
        self.traceback = str(payload.get("traceback") or "")
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.payload,))


class RemoteTraceback(Exception):
    """A worker's formatted traceback, attached as ``__cause__`` of a task's exception
    that crossed a process boundary (as ``concurrent.futures.ProcessPoolExecutor`` does),
    so the printed traceback shows the failing line on the worker."""

    def __init__(self, traceback: str) -> None:
        super().__init__(traceback)
        #: the formatted traceback text
        self.traceback = traceback

    def __str__(self) -> str:
        return f'\n"""\n{self.traceback.rstrip()}\n"""'


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


class PayloadTooLargeError(DispatchError):
    """A command is larger than its transport's limit; raised before anything is sent.

    Attributes:
        size: the encoded command's size in bytes.
        limit: the limit in bytes.
        setting: the setting that raises the limit (``executor_config.max_message_bytes``).
    """

    def __init__(self, message: str, *, size: int, limit: int, setting: str) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit
        self.setting = setting


class StreamNotSupportedError(RuntimeError):
    """``runtime.stream`` on an environment whose worker did not announce streamed results
    (the ``task_yield`` capability): a Wove 2.x worker, or an executor without it. Raised at
    the call, before anything is sent."""


def exception_chain(exc: BaseException, *, attributes: tuple[str, ...] = ()) -> list[BaseException]:
    """``exc``, its causes and contexts, and exceptions held in the named ``attributes``
    (such as aiohttp's ``os_error``), outermost first and each once: what a transport's
    error table matches against."""
    found: list[BaseException] = []
    todo: list[Any] = [exc]
    while todo:
        item = todo.pop(0)
        if not isinstance(item, BaseException) or any(item is seen for seen in found):
            continue
        found.append(item)
        todo.extend([item.__cause__, item.__context__, *(getattr(item, name, None) for name in attributes)])
    return found
