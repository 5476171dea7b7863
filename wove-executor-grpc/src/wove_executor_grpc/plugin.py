"""The ``grpc`` plugin: executor, ``wove worker grpc`` and the ``wove demo`` environment.

Imports only wove and this package's light modules; ``grpc`` is imported when an
executor starts or a server is started.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from wove import hookimpl

from .executor import GrpcEnvironmentExecutor


@hookimpl
def wove_register_executors(register: Callable[..., None]) -> None:
    register("grpc", GrpcEnvironmentExecutor,
             description="gRPC worker service (grpc.aio; unary Send, streaming Stream extension)")


def _seconds(text: str, *, off: bool = True) -> float | None:
    """A ``--...-timeout`` value: positive seconds, or ``off`` (None) where allowed."""
    if off and text.strip().lower() in ("off", "none"):
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(
            f"must be a positive number of seconds{' or off' if off else ''}, got {text!r}")
    return value


def _seconds_not_off(text: str) -> float | None:
    return _seconds(text, off=False)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    from . import server

    parser.add_argument("--certfile", default=None, help="serve TLS with this PEM certificate chain")
    parser.add_argument("--keyfile", default=None, help="PEM private key for --certfile")
    parser.add_argument("--client-ca", default=None,
                        help="require client certificates signed by this PEM CA (mTLS; needs --certfile)")
    parser.add_argument("--max-runs-per-session", type=int, default=10_000,
                        help="runs one Session call may have in progress (default 10000)")
    # connection timeouts (start_server's arguments of the same names; seconds, or "off")
    timeouts = parser.add_argument_group("connection timeouts (seconds; 'off' disables)")
    timeouts.add_argument("--handshake-timeout", metavar="SECONDS", type=_seconds, default=server.DEFAULT_HANDSHAKE_TIMEOUT,
                          help="close a connection that has not finished its TLS and HTTP/2 setup by then, "
                          f"such as a TCP connection that sends nothing (default {server.DEFAULT_HANDSHAKE_TIMEOUT:g})")
    timeouts.add_argument("--idle-timeout", metavar="SECONDS", type=_seconds, default=server.DEFAULT_IDLE_TIMEOUT,
                          help="GOAWAY and close a connection without calls for this long; clients reconnect "
                          f"(default {server.DEFAULT_IDLE_TIMEOUT:g})")
    timeouts.add_argument("--keepalive-interval", metavar="SECONDS", type=_seconds, default=server.DEFAULT_KEEPALIVE_INTERVAL,
                          help="ping each connection this often (off: no server pings; default "
                          f"{server.DEFAULT_KEEPALIVE_INTERVAL:g})")
    timeouts.add_argument("--keepalive-timeout", metavar="SECONDS", type=_seconds_not_off, default=server.DEFAULT_KEEPALIVE_TIMEOUT,
                          help="drop a connection, with its calls, whose ping is not answered within this "
                          f"(default {server.DEFAULT_KEEPALIVE_TIMEOUT:g})")
    timeouts.add_argument("--max-connection-age", metavar="SECONDS", type=_seconds, default=None,
                          help="GOAWAY connections older than this (default off: a Session may last for hours)")
    timeouts.add_argument("--max-connection-age-grace", metavar="SECONDS", type=_seconds, default=None,
                          help="after that GOAWAY, seconds the connection's calls get to finish (default off)")


def _run(args: argparse.Namespace) -> int:
    from .server import run

    return run(args)


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
