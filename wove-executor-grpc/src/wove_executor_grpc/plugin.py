"""The ``grpc`` plugin: executor, ``wove worker grpc`` and the ``wove demo`` environment.

Imports only wove and this package's light modules; ``grpc`` is imported when an
executor starts or a server is started.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from wove import hookimpl

from .executor import GrpcEnvironmentExecutor

if TYPE_CHECKING:
    import argparse


@hookimpl
def wove_register_executors(register: Callable[..., None]) -> None:
    register("grpc", GrpcEnvironmentExecutor,
             description="gRPC worker service (grpc.aio; unary Send, streaming Stream extension)")


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--certfile", default=None, help="serve TLS with this PEM certificate chain")
    parser.add_argument("--keyfile", default=None, help="PEM private key for --certfile")
    parser.add_argument("--client-ca", default=None,
                        help="require client certificates signed by this PEM CA (mTLS; needs --certfile)")


def _run(args: argparse.Namespace) -> int:
    from .server import run_cli

    return run_cli(args)


@hookimpl
def wove_worker_services(register: Callable[..., None]) -> None:
    register("grpc", _add_arguments, _run, help="serve the worker engine over gRPC (grpc.aio)")


@contextlib.asynccontextmanager
async def _demo() -> AsyncIterator[dict[str, Any]]:
    from .server import start_server

    running = await start_server(host="127.0.0.1", port=0)
    try:
        yield {"executor": "grpc", "executor_config": {"target": running.target}}
    finally:
        await running.stop(grace=1.0)


@hookimpl
def wove_demo_environments(register: Callable[..., None]) -> None:
    register("grpc", _demo)
