"""Registers the ``celery`` executor (imports no Celery)."""

from __future__ import annotations

from collections.abc import Callable

from wove import hookimpl
from wove.backend import BackendAdapterEnvironmentExecutor, register_backend_adapter

from .adapter import CeleryAdapter

__all__ = ["build_celery_executor", "wove_register_executors"]


def build_celery_executor() -> BackendAdapterEnvironmentExecutor:
    """A fresh, unstarted ``celery`` executor."""
    return BackendAdapterEnvironmentExecutor("celery", CeleryAdapter)


@hookimpl
def wove_register_executors(register: Callable[..., None]) -> None:
    register_backend_adapter("celery", CeleryAdapter)
    register("celery", build_celery_executor,
             description="Celery workers through a broker (RabbitMQ, Redis); outcomes also via the result backend")
