"""Fixtures: ``wove worker websocket`` subprocesses on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

SECRET_ENV = "WOVE_WS_TEST_SECRET"
SECRET = "test-secret-for-ws-worker"


class WorkerProcess:
    """A ``wove worker websocket`` subprocess that can be killed and restarted on its port."""

    def __init__(self, *extra: str, env: dict[str, str] | None = None) -> None:
        self.extra = extra
        self.env = {**os.environ, **(env or {})}
        self.port = 0
        self.url = ""
        self.proc: subprocess.Popen[str] | None = None
        self.stderr: list[str] = []

    def start(self, port: int | None = None, timeout: float = 20.0) -> str:
        """Start (on ``port``, default: the previous one or a free one); returns the URL."""
        port = self.port if port is None else port
        command = [sys.executable, "-m", "wove.cli", "worker", "websocket", "--port", str(port), *self.extra]
        deadline = time.monotonic() + timeout
        while True:  # the old socket may linger briefly after a kill
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env)
            line = _read_line(proc, deadline)
            if line is not None and "listening on" in line:
                break
            proc.kill()
            _, err = proc.communicate(timeout=5)
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start: {line!r}\n{err}")
            time.sleep(0.1)
        self.proc = proc
        self.url = line.split("listening on", 1)[1].strip()
        self.port = int(self.url.rsplit(":", 1)[1].split("/", 1)[0])
        threading.Thread(target=self._drain, args=(proc,), daemon=True).start()
        return self.url

    def _drain(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self.stderr.append(line)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def _read_line(proc: subprocess.Popen[str], deadline: float) -> str | None:
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(max(deadline - time.monotonic(), 0.1))
    return result[0] if result else None


@pytest.fixture
def worker_factory() -> Iterator[type[WorkerProcess]]:
    """Build WorkerProcess objects that are stopped at the end of the test."""
    made: list[WorkerProcess] = []

    def factory(*extra: str, env: dict[str, str] | None = None) -> WorkerProcess:
        worker = WorkerProcess(*extra, env=env)
        made.append(worker)
        return worker

    yield factory  # type: ignore[misc]
    for worker in made:
        worker.kill()


@pytest.fixture(scope="module")
def shared_worker() -> Iterator[WorkerProcess]:
    """One unsigned worker for a whole module (contract tests)."""
    worker = WorkerProcess()
    worker.start(0)
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def signed_worker() -> Iterator[WorkerProcess]:
    worker = WorkerProcess("--security", f"env:{SECRET_ENV}", env={SECRET_ENV: SECRET})
    worker.start(0)
    yield worker
    worker.stop()


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    return f"env:{SECRET_ENV}"
