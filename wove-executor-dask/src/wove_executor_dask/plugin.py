"""Registers the ``dask`` executor and its demo environment (imports no Dask)."""

from __future__ import annotations

import contextlib
import logging
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
        # The executor starts (and stops) the embedded LocalCluster itself. Dask logs its
        # cluster's lifecycle at INFO and harmless comm errors at teardown: keep the demo's
        # output to the table.
        import distributed  # noqa: F401 - applies Dask's logging config, which we then quiet

        loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
                   if name == "distributed" or name.startswith("distributed.")]
        levels = [logger.level for logger in loggers]
        for logger in loggers:
            logger.setLevel(logging.CRITICAL)
        try:
            yield {"executor": "dask",
                   "executor_config": {"n_workers": 2, "threads_per_worker": 2, "processes": False}}
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)

    register("dask", dask)
