"""Registers the ``example`` executor and its ``wove demo`` environment.

Keep this module light: import your transport library in ``start()``, and anything the
demo needs (a worker service, a cluster) inside the demo's context manager.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from wove import hookimpl

from .executor import ExampleEnvironmentExecutor


@hookimpl
def wove_register_executors(register: Callable[..., None]) -> None:
    register("example", ExampleEnvironmentExecutor, description="example: frames through an in-process queue")


@contextlib.asynccontextmanager
async def _demo() -> AsyncIterator[dict[str, Any]]:
    # Start what the environment needs on loopback here (a worker service, a cluster),
    # yield the environment definition, and stop it again after the yield.
    yield {"executor": "example", "executor_config": {}}


@hookimpl
def wove_demo_environments(register: Callable[..., None]) -> None:
    """``wove demo`` runs a small workload through every environment registered here."""
    register("example", _demo)
