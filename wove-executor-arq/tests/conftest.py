"""Fixtures: the machine's Redis (database 4) and a real ``arq`` worker process per test module."""

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

#: The Redis database the arq tests use (the rq and taskiq tests use 3 and 5).
REDIS_DB = 4
ARQ = Path(sys.executable).with_name("arq")
SETTINGS = """\
from arq.connections import RedisSettings
from wove_executor_arq.worker import worker_settings

WorkerSettings = worker_settings(redis_settings=RedisSettings.from_dsn({url!r}), queue_name={queue!r},
                                 poll_delay=0.02, max_jobs=32)
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


class ArqWorkerProcess:
    """``arq <settings>.WorkerSettings`` on its own queue, as a subprocess; :meth:`start` again after a kill."""

    def __init__(self, url: str, queue: str, folder: Path) -> None:
        self.url, self.queue, self.folder = url, queue, folder
        self.module = f"arq_settings_{uuid.uuid4().hex[:8]}"
        (folder / f"{self.module}.py").write_text(SETTINGS.format(url=url, queue=queue))
        self.log = folder / "worker.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        from redis import Redis

        connection = Redis.from_url(self.url)
        health = f"{self.queue}:health-check"
        connection.delete(health)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([str(ARQ), f"{self.module}.WorkerSettings"], stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True, cwd=self.folder)
        try:
            deadline = time.monotonic() + 30
            while not connection.exists(health):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the arq worker did not start (exit {self.proc.poll()}):\n"
                                       f"{self.log.read_text(errors='replace')[-3000:]}")
                time.sleep(0.05)
        finally:
            connection.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL (the task dies with the worker: arq runs jobs in the worker process)."""
        if self.running:
            assert self.proc is not None
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.running:
            assert self.proc is not None
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """``redis://host:port/4``, flushed after the module (the database is the arq tests' own)."""
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
def arq_worker(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ArqWorkerProcess]:
    """One arq worker (Wove's worker_settings, poll_delay 0.02 s, max_jobs 32) on a queue of its own."""
    if not ARQ.exists():
        pytest.skip(f"the arq command is not installed next to {sys.executable} (pip install wove-executor-arq)")
    worker = ArqWorkerProcess(redis_url, f"wove-test-{uuid.uuid4().hex[:8]}", tmp_path_factory.mktemp("arq"))
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()
