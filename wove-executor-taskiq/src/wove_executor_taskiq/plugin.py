"""Registers the ``taskiq`` executor (imports no taskiq)."""

from __future__ import annotations

from collections.abc import Callable

from wove import hookimpl
from wove.backend import BackendAdapterEnvironmentExecutor, register_backend_adapter

from .adapter import TaskiqAdapter

__all__ = ["build_taskiq_executor", "wove_register_executors"]


def build_taskiq_executor() -> BackendAdapterEnvironmentExecutor:
    """A fresh, unstarted ``taskiq`` executor."""
    return BackendAdapterEnvironmentExecutor("taskiq", TaskiqAdapter)


@hookimpl
def wove_register_executors(register: Callable[..., None]) -> None:
    register_backend_adapter("taskiq", TaskiqAdapter)
    register("taskiq", build_taskiq_executor, description="taskiq: tasks on taskiq workers (taskiq-redis)")
