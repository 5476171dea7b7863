"""Fixtures: `wove worker grpc` subprocesses on 127.0.0.1 (port 0) and helpers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from wove.testing import WorkerProcess as BaseWorkerProcess


class WorkerProcess(BaseWorkerProcess):
    """A `wove worker grpc` subprocess; ``target`` is its ``host:port``."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, port: int = 0) -> None:
        super().__init__("grpc", *args, env=env)
        self.port = port

    def start(self, port: int | None = None) -> WorkerProcess:  # type: ignore[override]
        super().start(port)
        return self

    @property
    def target(self) -> str:
        return self.address


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
