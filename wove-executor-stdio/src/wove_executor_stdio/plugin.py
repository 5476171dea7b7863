"""Registers the ``stdio`` executor and its ``wove demo`` environment (light: no I/O here)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from wove import hookimpl

from .executor import StdioEnvironmentExecutor


@hookimpl
def wove_register_executors(register: Callable[..., None]) -> None:
    """Register ``stdio``: a pool of worker subprocesses speaking JSON lines."""
    register(
        "stdio",
        StdioEnvironmentExecutor,
        description="worker subprocesses over JSON lines (python -m wove_executor_stdio)",
    )


@contextlib.asynccontextmanager
async def _demo() -> AsyncIterator[dict[str, Any]]:
    # The executor starts its own workers: nothing to run beforehand.
    yield {"executor": "stdio", "executor_config": {"processes": 2}}


@hookimpl
def wove_demo_environments(register: Callable[..., None]) -> None:
    """Offer ``stdio`` (two worker processes) to ``wove demo``."""
    register("stdio", _demo)
