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
    parser.add_argument("--metrics", action="store_true",
                        help="serve Prometheus metrics at /metrics on --port (or use --metrics-port for a port of "
                        "their own); needs wove-core[metrics]")


def run_worker(args: argparse.Namespace) -> int:
    """``wove worker http``: serve with uvicorn until SIGINT/SIGTERM, then drain
    (:func:`wove.serve.run_service`: runs in flight finish within ``--grace``, the rest end
    with a terminal event, exit 0; a second signal exits at once)."""
    import ssl

    from wove.serve import bind_socket, run_service

    from .server import create_app, start_server, url_for, uvicorn_config

    if args.keyfile and not args.certfile:
        print("wove worker http: --keyfile needs --certfile.", file=sys.stderr)
        return 2
    try:
        app = create_app(security=args.security, max_concurrency=args.max_concurrency,
                         max_body_bytes=args.max_body_bytes, path=args.path,
                         allow_remote_shutdown=args.allow_remote_shutdown, shutdown_grace=args.grace,
                         body_timeout=args.body_timeout, header_timeout=args.header_timeout,
                         keepalive_timeout=args.keepalive_timeout, metrics=getattr(args, "metrics", False))
        sock = bind_socket(args.host, args.port)
    except (ValueError, TypeError, RuntimeError, OSError) as exc:
        print(f"wove worker http: {exc}", file=sys.stderr)
        return 2
    tls = bool(args.certfile)
    # connections only finish sending once the drain ended every run
    options: dict[str, Any] = {"timeout_graceful_shutdown": 5}
    if tls:
        options.update(ssl_certfile=args.certfile, ssl_keyfile=args.keyfile)
        if args.ca_certs:
            options.update(ssl_ca_certs=args.ca_certs, ssl_cert_reqs=ssl.CERT_REQUIRED)
    url = url_for(args.host, sock.getsockname()[1], app.path, tls=tls)
    serving: list[tuple[Any, asyncio.Task[None]]] = []
    try:
        config = uvicorn_config(app, **options)
        config.load()  # reads the TLS files: a bad one fails here, before the ready line
    except BaseException:
        sock.close()
        raise

    async def start() -> str:
        serving.append(await start_server(app, sock, config))
        return url

    async def stop(grace: float) -> None:
        await app.drain(grace)
        for server, task in serving:
            server.should_exit = True
            await task

    try:
        return run_service("http", start, stop, grace=args.grace, loop_factory=_loop_factory(config),
                           service=app.service, metrics_port=getattr(args, "metrics_port", None),
                           metrics_host=getattr(args, "metrics_host", None))
    finally:
        sock.close()


def _loop_factory(config: Any) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvicorn's choice of event loop (uvloop when installed: ~3x the requests per second)."""
    get = getattr(config, "get_loop_factory", None)  # uvicorn >= 0.36
    if get is not None:
        factory: Callable[[], asyncio.AbstractEventLoop] | None = get()
        return factory
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop  # type: ignore[no-any-return]


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
    from wove.serve import bind_socket

    from .server import create_app, start_server, url_for, uvicorn_config

    app = app or create_app()
    sock = bind_socket(host, port)
    bound = sock.getsockname()[1]
    try:
        server, task = await start_server(app, sock, uvicorn_config(app, **options))
    except BaseException:
        sock.close()
        raise
    try:
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
