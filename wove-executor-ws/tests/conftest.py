"""Fixtures: ``wove worker websocket`` subprocesses on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from wove.testing import WorkerProcess as BaseWorkerProcess

SECRET_ENV = "WOVE_WS_TEST_SECRET"
SECRET = "test-secret-for-ws-worker"


class WorkerProcess(BaseWorkerProcess):
    """A ``wove worker websocket`` subprocess that can be killed and restarted on its port."""

    def __init__(self, *extra: str, env: dict[str, str] | None = None) -> None:
        super().__init__("websocket", *extra, env=env, startup_timeout=20.0)

    @property
    def url(self) -> str:
        return self.address


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
