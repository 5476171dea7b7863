"""Fixtures: the machine's Redis (database 3) and a real ``rq worker`` process per test module."""

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

#: The Redis database the rq tests use (the arq and taskiq tests use 4 and 5).
REDIS_DB = 3
RQ = Path(sys.executable).with_name("rq")


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


class RQWorkerProcess:
    """``rq worker`` on its own queue, as a subprocess; :meth:`restart` after a kill."""

    def __init__(self, url: str, queue: str, log: Path, worker_class: str) -> None:
        self.url, self.queue, self.log, self.worker_class = url, queue, log, worker_class
        self.proc: subprocess.Popen[bytes] | None = None
        self.name = ""

    def start(self) -> None:
        from redis import Redis

        self.name = f"wove-test-{uuid.uuid4().hex[:12]}"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(RQ), "worker", "--url", self.url, "--worker-class", self.worker_class, "--name", self.name,
                 "--logging_level", "WARNING", self.queue],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.log.parent,
            )
        connection = Redis.from_url(self.url)
        try:
            deadline = time.monotonic() + 30
            channel = f"rq:pubsub:{self.name}"
            while dict(connection.pubsub_numsub(channel)).get(channel.encode(), 0) == 0:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"rq worker did not start (exit {self.proc.poll()}):\n"
                                       f"{self.log.read_text(errors='replace')[-3000:]}")
                time.sleep(0.05)
        finally:
            connection.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL the worker (its forked work horses are in their own process groups)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """``redis://host:port/3``, flushed after the module (the database is the rq tests' own)."""
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
def rq_worker(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RQWorkerProcess]:
    """One ``rq worker --worker-class wove_executor_rq.worker.Worker`` on a queue of its own."""
    if not RQ.exists():
        pytest.skip(f"the rq command is not installed next to {sys.executable} (pip install wove-executor-rq)")
    folder = tmp_path_factory.mktemp("rq-worker")
    worker = RQWorkerProcess(redis_url, f"wove-test-{uuid.uuid4().hex[:8]}", folder / "worker.log",
                             "wove_executor_rq.worker.Worker")
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()
