"""Fixtures: the machine's Redis (database 5) and a real ``taskiq worker`` per test module."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

#: The Redis database the taskiq tests use (the rq and arq tests use 3 and 4).
REDIS_DB = 5
TASKIQ = Path(sys.executable).with_name("taskiq")
TASKS = """\
from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend
from wove_executor_taskiq.worker import register

broker = ListQueueBroker({url!r}, queue_name={queue!r}).with_result_backend(RedisAsyncResultBackend({url!r}))
register(broker)
"""


def redis_address() -> tuple[str, int]:
    """Redis at 127.0.0.1:6379 (or ``WOVE_TEST_REDIS``), or a skip (a failure under CI=true)."""
    import socket

    host, _, port = os.environ.get("WOVE_TEST_REDIS", "127.0.0.1:6379").partition(":")
    address = (host, int(port or 6379))
    try:
        socket.create_connection(address, timeout=2.0).close()
    except OSError as exc:
        message = (f"Redis is not reachable at {host}:{address[1]} ({exc}); start it with `redis-server "
                   "--daemonize yes` (Debian: apt install redis-server) or set WOVE_TEST_REDIS=host:port")
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message} (CI=true: a missing service fails the run)")
        pytest.skip(message)
    return address


class TaskiqWorkerProcess:
    """``taskiq worker <module>:broker --workers 1``: a main process that restarts its worker child."""

    def __init__(self, url: str, queue: str, folder: Path) -> None:
        self.url, self.queue, self.folder = url, queue, folder
        self.module = f"taskiq_tasks_{uuid.uuid4().hex[:8]}"
        (folder / f"{self.module}.py").write_text(TASKS.format(url=url, queue=queue))
        self.log = folder / "worker.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def broker_path(self) -> str:
        """``module:broker`` (importable once :attr:`folder` is on ``sys.path``)."""
        return f"{self.module}:broker"

    def listening(self) -> int:
        """How many worker children have started listening so far."""
        return self.log.read_text(errors="replace").count("Listening started") if self.log.exists() else 0

    def wait_listening(self, count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.listening() < count:
            if self.proc is None or self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"taskiq worker not listening (exit {self.proc and self.proc.poll()}):\n"
                                   f"{self.log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.05)

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(TASKIQ), "worker", self.broker_path, "--workers", "1", "--max-fails", "100"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.folder)
        self.wait_listening(self.listening() + 1)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """``redis://host:port/5``, flushed after the module (the database is the taskiq tests' own)."""
    from redis import Redis

    host, port = redis_address()
    url = f"redis://{host}:{port}/{REDIS_DB}"
    yield url
    connection = Redis.from_url(url)
    try:
        connection.flushdb()
    finally:
        connection.close()


@pytest.fixture(scope="module")
def taskiq_worker(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TaskiqWorkerProcess]:
    """One ``taskiq worker`` (one child) on a queue of its own, with Wove's task registered."""
    if not TASKIQ.exists():
        pytest.skip(f"the taskiq command is not installed next to {sys.executable} (pip install wove-executor-taskiq)")
    worker = TaskiqWorkerProcess(redis_url, f"wove-test-{uuid.uuid4().hex[:8]}", tmp_path_factory.mktemp("taskiq"))
    worker.start()
    sys.path.insert(0, str(worker.folder))  # the tests load the same broker module by its path
    try:
        yield worker
    finally:
        sys.path.remove(str(worker.folder))
        worker.stop()
