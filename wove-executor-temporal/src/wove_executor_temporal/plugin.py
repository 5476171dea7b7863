"""Registers the ``temporal`` executor (imports no temporalio)."""

from __future__ import annotations

from collections.abc import Callable

from wove import hookimpl
from wove.backend import BackendAdapterEnvironmentExecutor, register_backend_adapter

from .adapter import TemporalAdapter

__all__ = ["build_temporal_executor", "wove_register_executors"]


def build_temporal_executor() -> BackendAdapterEnvironmentExecutor:
    """A fresh, unstarted ``temporal`` executor."""
    return BackendAdapterEnvironmentExecutor("temporal", TemporalAdapter)


@hookimpl
def wove_register_executors(register: Callable[..., None]) -> None:
    register_backend_adapter("temporal", TemporalAdapter)
    register("temporal", build_temporal_executor,
             description="Temporal: each task a workflow on a task queue that Wove workers poll")
