"""Registers the ``websocket`` executor, its ``wove worker websocket`` service and a demo.

This module stays light: it imports neither ``websockets`` nor the server.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from wove import hookimpl

from .executor import WebSocketEnvironmentExecutor

__all__ = ["wove_demo_environments", "wove_register_executors", "wove_worker_services"]


@hookimpl
def wove_register_executors(register: Callable[..., None]) -> None:
    register(
        "websocket",
        WebSocketEnvironmentExecutor,
        aliases=("ws",),
        description="WebSocket worker service: every run multiplexed over one connection",
    )


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--path", default="/wove", help="URL path served (default /wove)")
    parser.add_argument("--certfile", default=None, help="TLS certificate (PEM) to serve wss://")
    parser.add_argument("--keyfile", default=None, help="TLS private key (PEM) for --certfile")
    parser.add_argument("--max-runs-per-connection", type=int, default=10_000,
                        help="runs one connection may have in progress (default 10000)")
    parser.add_argument("--metrics", action="store_true",
                        help="answer GET /metrics (Prometheus) on --port, beside /healthz and /readyz (or use "
                        "--metrics-port for a port of their own); needs wove-core[metrics]")


def _run(args: argparse.Namespace) -> int:
    from .server import run

    return run(args)


@hookimpl
def wove_worker_services(register: Callable[..., None]) -> None:
    register("websocket", _add_arguments, _run, help="serve the worker engine over WebSocket (websockets)")


@hookimpl
def wove_demo_environments(register: Callable[..., None]) -> None:
    @contextlib.asynccontextmanager
    async def websocket() -> AsyncIterator[dict[str, Any]]:
        from .server import WebSocketWorkerServer

        async with WebSocketWorkerServer(host="127.0.0.1", port=0) as server:
            yield {"executor": "websocket", "executor_config": {"url": server.url}}

    register("websocket", websocket)
