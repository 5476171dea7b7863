"""Registers the ``ray`` executor (imports no Ray)."""

from __future__ import annotations

from collections.abc import Callable

from wove import hookimpl
from wove.backend import BackendAdapterEnvironmentExecutor, register_backend_adapter

from .adapter import RayAdapter

__all__ = ["build_ray_executor", "wove_register_executors"]


def build_ray_executor() -> BackendAdapterEnvironmentExecutor:
    """A fresh, unstarted ``ray`` executor."""
    return BackendAdapterEnvironmentExecutor("ray", RayAdapter)


@hookimpl
def wove_register_executors(register: Callable[..., None]) -> None:
    register_backend_adapter("ray", RayAdapter)
    register("ray", build_ray_executor,
             description="Ray: tasks on a Ray cluster (address) or a local Ray started by ray.init()")
