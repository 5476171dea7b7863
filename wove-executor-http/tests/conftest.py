"""Fixtures: real ``wove worker http`` services on 127.0.0.1 (subprocesses) and helpers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

SECRET_ENV = "WOVE_HTTP_TEST_SECRET"
SECRET = "correct horse battery staple"


class Worker:
    """A ``wove worker http`` subprocess and its URL."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        command = [sys.executable, "-m", "wove.cli", "worker", "http", "--port", "0", *args]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(self.proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(30)
        if not lines or "listening on " not in lines[0]:
            self.stop()
            raise RuntimeError(f"worker did not start: {lines!r}; stderr: {self.proc.stderr.read()[-2000:]}")  # type: ignore[union-attr]
        self.url = lines[0].split("listening on ", 1)[1].strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


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
