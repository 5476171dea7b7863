"""wove.environment: the executor contract and the runtime bridge.

Sends tasks to local, subprocess or remote task environments. The transport executors
(:class:`StdioEnvironmentExecutor`, :class:`HttpEnvironmentExecutor`,
:class:`GrpcEnvironmentExecutor`, :class:`WebSocketEnvironmentExecutor`) live in their
own distributions, and so does :class:`BackendAdapterEnvironmentExecutor` (wove-backend);
each is imported from here on first access; until its distribution is installed,
importing the class raises ImportError naming it.

The calling API beyond the seed (see docs/calling.md): :meth:`ExecutorRuntime.submit`
returns a :class:`RunFuture`; :func:`as_completed` and :func:`gather` work over them;
:meth:`ExecutorRuntime.map` returns a :class:`MapIterator` (progress as
:class:`MapProgress`); :class:`Client` is the runtime for synchronous code, and
:meth:`Client.executor` a :class:`ClientExecutor` (a ``concurrent.futures.Executor``);
:meth:`ExecutorRuntime.stream` a :class:`RunStream` of a generator task's items
(:class:`StreamNotSupportedError` where the worker does not stream).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .client import Client, ClientExecutor
from .errors import (
    DeliveryOrphanedError,
    DeliveryTimeoutError,
    EnvironmentExecutionError,
    MissingDispatchFeatureError,
    StreamNotSupportedError,
)
from .executor import EnvironmentExecutor
from .futures import MapIterator, MapProgress, RunFuture, as_completed, gather
from .local import LocalEnvironmentExecutor
from .protocol import normalize_exception
from .registry import build_executor_from_name, install_hint
from .runtime import ExecutorRuntime, coerce_executor
from .streaming import RunStream

if TYPE_CHECKING:  # the lazily imported names below, for type checkers and the API reference
    from wove_backend import BackendAdapterEnvironmentExecutor
    from wove_executor_grpc import GrpcEnvironmentExecutor
    from wove_executor_http import HttpEnvironmentExecutor
    from wove_executor_stdio import StdioEnvironmentExecutor
    from wove_executor_ws import WebSocketEnvironmentExecutor

__all__ = [
    "BackendAdapterEnvironmentExecutor",
    "Client",
    "ClientExecutor",
    "DeliveryOrphanedError",
    "DeliveryTimeoutError",
    "EnvironmentExecutionError",
    "EnvironmentExecutor",
    "ExecutorRuntime",
    "GrpcEnvironmentExecutor",
    "HttpEnvironmentExecutor",
    "LocalEnvironmentExecutor",
    "MapIterator",
    "MapProgress",
    "MissingDispatchFeatureError",
    "RunFuture",
    "RunStream",
    "StdioEnvironmentExecutor",
    "StreamNotSupportedError",
    "WebSocketEnvironmentExecutor",
    "as_completed",
    "build_executor_from_name",
    "coerce_executor",
    "gather",
    "normalize_exception",
]

# class name -> (module, distribution)
_LAZY = {
    "StdioEnvironmentExecutor": ("wove_executor_stdio", "wove-executor-stdio"),
    "HttpEnvironmentExecutor": ("wove_executor_http", "wove-executor-http"),
    "GrpcEnvironmentExecutor": ("wove_executor_grpc", "wove-executor-grpc"),
    "WebSocketEnvironmentExecutor": ("wove_executor_ws", "wove-executor-ws"),
    "BackendAdapterEnvironmentExecutor": ("wove_backend", "wove-backend"),
}


def __getattr__(name: str) -> Any:
    try:
        module_name, distribution = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'wove.environment' has no attribute {name!r}") from None
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(
            f"{name} is provided by the {distribution} distribution, which is not installed. "
            f"Install it with: {install_hint(distribution)}",
            name=module_name,
        ) from exc
    try:
        value = getattr(module, name)
    except AttributeError:
        raise ImportError(f"{name} is not available in the installed {distribution}.") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
