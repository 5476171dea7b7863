"""A Starlette (or FastAPI) application with the Wove worker service mounted in it.

The web application serves its own routes and, under ``/workers``, the HTTP worker
service (``wove_executor_http.server.create_app``: an ASGI app, mountable like any
other). Clients then use ``url="http://HOST:PORT/workers/wove"``. Routers do not pass
lifespan events to mounted apps, so the host application's lifespan drains the workers
on shutdown. With FastAPI it is the same: ``app.mount("/workers", workers)``.

This program serves the app with uvicorn on a free loopback port, calls a task through
the mounted worker and the app's own route, then shuts the server down. Run it:
``uv run python examples/starlette_app.py``, or ``python starlette_app.py`` with
``wove-executor-http`` and ``starlette`` installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from wove.environment import ExecutorRuntime
from wove_executor_http.server import create_app

# On a non-loopback address, give it security="env:WOVE_SECRET" (and TLS in front).
workers = create_app(max_concurrency=64)


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    yield
    await workers.drain(10.0)  # let runs in flight finish, then end the rest with a terminal event


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok", "pid": os.getpid()})


app = Starlette(routes=[Route("/health", health), Mount("/workers", app=workers)], lifespan=lifespan)


def square_and_pid(x: int) -> tuple[int, int]:
    return x * x, os.getpid()


async def main() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # a free port
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.05)
    try:
        async with httpx.AsyncClient() as http:
            print((await http.get(f"http://127.0.0.1:{port}/health")).json()["status"])  # ok
        url = f"http://127.0.0.1:{port}/workers/wove"
        async with ExecutorRuntime({"app": {"executor": "http", "executor_config": {"url": url}}}) as runtime:
            square, pid = await runtime.call("app", square_and_pid, 12)
            print(square, "computed by the web application's process:", pid == os.getpid())  # 144 ... True
    finally:
        server.should_exit = True
        await serving
        sock.close()


if __name__ == "__main__":
    asyncio.run(main())
