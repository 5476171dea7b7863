"""Registers the ``rq`` executor (imports neither rq nor redis)."""

from __future__ import annotations

from collections.abc import Callable

from wove import hookimpl
from wove.backend import BackendAdapterEnvironmentExecutor, register_backend_adapter

from .adapter import RQAdapter

__all__ = ["build_rq_executor", "wove_register_executors"]


def build_rq_executor() -> BackendAdapterEnvironmentExecutor:
    """A fresh, unstarted ``rq`` executor."""
    return BackendAdapterEnvironmentExecutor("rq", RQAdapter)


@hookimpl
def wove_register_executors(register: Callable[..., None]) -> None:
    register_backend_adapter("rq", RQAdapter)
    register("rq", build_rq_executor, description="RQ (Redis Queue): jobs on rq workers")
