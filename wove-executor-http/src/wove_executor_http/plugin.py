"""The ``http`` plugin: executors ``http`` and ``https``, ``wove worker http`` and a demo.

Imports only wove and the executor class; httpx, uvicorn and aiohttp load when an
executor starts or the worker service runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

from wove import hookimpl

from .executor import HttpEnvironmentExecutor

__all__ = ["run_worker", "serve_in_background"]


def _https() -> HttpEnvironmentExecutor:
    return HttpEnvironmentExecutor(require_https=True)


@hookimpl
def wove_register_executors(register: Callable[..., None]) -> None:
    register("http", HttpEnvironmentExecutor, description="POST frames to a worker service (httpx)")
    register("https", _https, description="like http, but refuses a URL that is not https://")


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--path", default="/wove", help="URL path of the command endpoint (default /wove)")
    parser.add_argument("--certfile", default=None, help="TLS certificate (PEM); serves https:// when given")
    parser.add_argument("--keyfile", default=None, help="TLS private key (PEM) for --certfile")
    parser.add_argument("--ca-certs", default=None,
                        help="CA bundle for client certificates; when given, clients must present one")
    # before --grace was every service's flag (documented alias)
    parser.add_argument("--shutdown-grace", dest="grace", type=float, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser.add_argument("--body-timeout", type=float, default=60.0,
                        help="seconds a request body may take to arrive; 408 after that (default 60)")
    parser.add_argument("--header-timeout", type=float, default=30.0,
                        help="seconds a connection may take to send complete request headers (default 30)")
    parser.add_argument("--keepalive-timeout", type=float, default=35.0,
                        help="seconds an idle keep-alive connection stays open (default 35)")


def run_worker(args: argparse.Namespace) -> int:
    """``wove worker http``: serve the worker engine with uvicorn until SIGINT/SIGTERM."""
    import signal
    import ssl

    from .server import bind_socket, create_app, make_server, url_for, uvicorn_config

    if args.keyfile and not args.certfile:
        print("wove worker http: --keyfile needs --certfile.", file=sys.stderr)
        return 2
    try:
        app = create_app(security=args.security, max_concurrency=args.max_concurrency,
                         max_body_bytes=args.max_body_bytes, path=args.path,
                         allow_remote_shutdown=args.allow_remote_shutdown, shutdown_grace=args.grace,
                         body_timeout=args.body_timeout, header_timeout=args.header_timeout,
                         keepalive_timeout=args.keepalive_timeout)
        sock = bind_socket(args.host, args.port)
    except (ValueError, TypeError, RuntimeError, OSError) as exc:
        print(f"wove worker http: {exc}", file=sys.stderr)
        return 2
    port = sock.getsockname()[1]
    tls = bool(args.certfile)
    options: dict[str, Any] = {"timeout_graceful_shutdown": args.grace + 5}
    if tls:
        options.update(ssl_certfile=args.certfile, ssl_keyfile=args.keyfile)
        if args.ca_certs:
            options.update(ssl_ca_certs=args.ca_certs, ssl_cert_reqs=ssl.CERT_REQUIRED)
    url = url_for(args.host, port, app.path, tls=tls)
    try:
        config = uvicorn_config(app, **options)
        server = make_server(app, config, on_ready=lambda: _announce(url))
        # uvicorn re-raises the stop signal after its graceful shutdown; once the engine
        # has ended its runs, exiting with status 0 is the accurate answer.
        for stop_signal in (signal.SIGINT, signal.SIGTERM):
            signal.signal(stop_signal, lambda *_: None)
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0 if server.started else 1


def _announce(url: str) -> None:
    from wove.cli import announce_listening

    announce_listening(url)
    sys.stdout.flush()


@hookimpl
def wove_worker_services(register: Callable[..., None]) -> None:
    register("http", _add_arguments, run_worker, help="serve the worker engine over HTTP (ASGI, uvicorn)")


@contextlib.asynccontextmanager
async def serve_in_background(app: Any = None, *, host: str = "127.0.0.1", port: int = 0,
                              **options: Any) -> AsyncIterator[str]:
    """Run the worker service in this event loop (a uvicorn server task); yields its URL.

    Args:
        app: a :class:`~wove_executor_http.server.WorkerApp` (default: ``create_app()``).
        options: passed to ``uvicorn.Config`` (``ssl_certfile``, ...).

    Raises:
        RuntimeError: the server did not start within 10 seconds.
    """
    from .server import bind_socket, create_app, make_server, url_for, uvicorn_config

    app = app or create_app()
    sock = bind_socket(host, port)
    bound = sock.getsockname()[1]
    server = make_server(app, uvicorn_config(app, **options))
    server.capture_signals = contextlib.nullcontext  # the host program owns its signals
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        for _ in range(1000):
            if server.started or task.done():
                break
            await asyncio.sleep(0.01)
        if not server.started:
            if task.done() and task.exception() is not None:
                raise RuntimeError(f"HTTP worker service did not start: {task.exception()!r}")
            raise RuntimeError("HTTP worker service did not start within 10 seconds.")
        yield url_for(host, bound, app.path, tls="ssl_certfile" in options)
    finally:
        server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(task), 15)
        except (asyncio.TimeoutError, Exception):
            task.cancel()
        sock.close()


@hookimpl
def wove_demo_environments(register: Callable[..., None]) -> None:
    @contextlib.asynccontextmanager
    async def http_demo() -> AsyncIterator[dict[str, Any]]:
        async with serve_in_background() as url:
            yield {"executor": "http", "executor_config": {"url": url}}

    register("http", http_demo)
