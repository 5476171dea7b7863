"""Registers the ``dask`` executor and its demo environment (imports no Dask)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from wove import hookimpl
from wove.backend import BackendAdapterEnvironmentExecutor, register_backend_adapter

from .adapter import DaskAdapter

__all__ = ["build_dask_executor", "wove_demo_environments", "wove_register_executors"]


def build_dask_executor() -> BackendAdapterEnvironmentExecutor:
    """A fresh, unstarted ``dask`` executor."""
    return BackendAdapterEnvironmentExecutor("dask", DaskAdapter)


@hookimpl
def wove_register_executors(register: Callable[..., None]) -> None:
    register_backend_adapter("dask", DaskAdapter)
    register("dask", build_dask_executor,
             description="Dask distributed: an existing scheduler (address) or an embedded LocalCluster")


@hookimpl
def wove_demo_environments(register: Callable[..., None]) -> None:
    @contextlib.asynccontextmanager
    async def dask() -> AsyncIterator[dict[str, Any]]:
        # The executor starts (and stops) the embedded LocalCluster itself.
        yield {"executor": "dask",
               "executor_config": {"n_workers": 2, "threads_per_worker": 2, "processes": False}}

    register("dask", dask)
