"""Fixtures: `wove worker grpc` subprocesses on 127.0.0.1 (port 0) and helpers."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

STARTUP_TIMEOUT = 30.0


class WorkerProcess:
    """A `wove worker grpc` subprocess; ``target`` is its ``host:port``."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, port: int = 0) -> None:
        self.args = [sys.executable, "-m", "wove.cli", "worker", "grpc", "--port", str(port), *args]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self.target = ""
        self.port = port

    def start(self) -> WorkerProcess:
        self.proc = subprocess.Popen(
            self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env
        )
        lines: queue.Queue[str] = queue.Queue()
        assert self.proc.stdout is not None
        stdout = self.proc.stdout
        threading.Thread(target=lambda: [lines.put(line) for line in stdout], daemon=True).start()
        try:
            line = lines.get(timeout=STARTUP_TIMEOUT)
        except queue.Empty:
            self.kill()
            raise RuntimeError(f"`{' '.join(self.args)}` printed nothing within {STARTUP_TIMEOUT}s") from None
        if "listening on " not in line:
            self.kill()
            raise RuntimeError(f"unexpected first line from the worker: {line!r}; stderr: {self.stderr()}")
        self.target = line.split("listening on ", 1)[1].strip()
        self.port = int(self.target.rsplit(":", 1)[1])
        return self

    def stderr(self) -> str:
        if self.proc is None or self.proc.stderr is None or self.proc.poll() is None:
            return ""
        return self.proc.stderr.read()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="session")
def grpc_worker() -> Iterator[WorkerProcess]:
    """One unsigned `wove worker grpc` for the session."""
    worker = WorkerProcess().start()
    yield worker
    worker.stop()


@pytest.fixture
def worker_factory() -> Iterator[Callable[..., WorkerProcess]]:
    """Start `wove worker grpc` subprocesses (stopped after the test)."""
    started: list[WorkerProcess] = []

    def start(*args: str, env: dict[str, str] | None = None, port: int = 0) -> WorkerProcess:
        worker = WorkerProcess(*args, env=env, port=port).start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.kill()


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "marker"
