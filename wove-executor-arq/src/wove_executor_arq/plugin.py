"""Registers the ``arq`` executor (imports no arq)."""

from __future__ import annotations

from collections.abc import Callable

from wove import hookimpl
from wove.backend import BackendAdapterEnvironmentExecutor, register_backend_adapter

from .adapter import ARQAdapter

__all__ = ["build_arq_executor", "wove_register_executors"]


def build_arq_executor() -> BackendAdapterEnvironmentExecutor:
    """A fresh, unstarted ``arq`` executor."""
    return BackendAdapterEnvironmentExecutor("arq", ARQAdapter)


@hookimpl
def wove_register_executors(register: Callable[..., None]) -> None:
    register_backend_adapter("arq", ARQAdapter)
    register("arq", build_arq_executor, description="arq: asyncio jobs on arq workers (Redis)")
