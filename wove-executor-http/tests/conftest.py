"""Fixtures: real ``wove worker http`` services on 127.0.0.1 (subprocesses) and helpers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from wove.testing import WorkerProcess

SECRET_ENV = "WOVE_HTTP_TEST_SECRET"
SECRET = "correct horse battery staple"


class Worker(WorkerProcess):
    """A ``wove worker http`` subprocess (started at once) and its URL."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        super().__init__("http", *args, env=env)
        self.start(0)

    @property
    def url(self) -> str:
        return self.address


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    """An unauthenticated worker service on loopback."""
    service = Worker()
    yield service
    service.stop()


@pytest.fixture(scope="module")
def signed_worker() -> Iterator[Worker]:
    """A worker service verifying signatures with the secret in ``$WOVE_HTTP_TEST_SECRET``."""
    service = Worker("--security", f"env:{SECRET_ENV}", env={SECRET_ENV: SECRET})
    yield service
    service.stop()


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    return SECRET_ENV


def run(coro: Any, timeout: float = 50.0) -> Any:
    """Run a coroutine on a fresh loop with a bound."""
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def write_marker_task(path: str) -> str:
    Path(path).write_text("ran")
    return path


@contextlib.asynccontextmanager
async def serve_asgi(app: Any) -> AsyncIterator[int]:
    """Serve any ASGI app with uvicorn in this loop on 127.0.0.1; yields the port."""
    import uvicorn

    from wove_executor_http.server import bind_socket

    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="auto"))
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        for _ in range(500):
            if server.started:
                break
            await asyncio.sleep(0.01)
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        try:
            await asyncio.wait_for(task, 10)
        finally:
            sock.close()
