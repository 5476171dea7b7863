"""Registers the ``example`` executor, its ``wove worker example`` service and its demo.

Keep this module light: import your transport library in ``start()``, the service module
when the service runs, and anything the demo needs inside the demo's context manager.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from wove import hookimpl

from .executor import ExampleEnvironmentExecutor


@hookimpl
def wove_register_executors(register: Callable[..., None]) -> None:
    register("example", ExampleEnvironmentExecutor, description="example: JSON lines over TCP")


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of this service only: wove adds the common ones (--host, --port, --grace...)."""


def _run(args: argparse.Namespace) -> int:
    from .server import run

    return run(args)


@hookimpl
def wove_worker_services(register: Callable[..., None]) -> None:
    register("example", _add_arguments, _run, help="serve the worker engine as JSON lines over TCP")


@contextlib.asynccontextmanager
async def _demo() -> AsyncIterator[dict[str, Any]]:
    from .server import ExampleWorkerServer

    server = ExampleWorkerServer()
    address = await server.start()
    try:
        yield {"executor": "example", "executor_config": {"address": address}}
    finally:
        await server.stop(grace=1.0)


@hookimpl
def wove_demo_environments(register: Callable[..., None]) -> None:
    """``wove demo`` runs a small workload through every environment registered here."""
    register("example", _demo)
