"""Fixtures: a LocalCluster with worker processes, and a scheduler/worker started from the CLI."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

DASK = Path(sys.executable).with_name("dask")


@pytest.fixture(scope="module")
def process_cluster() -> Iterator[Any]:
    """A LocalCluster with 2 worker processes (its own loop thread), shared by a module."""
    import dask
    from distributed import LocalCluster

    # A worker dying with a task fails it at once (KilledWorker) instead of Dask re-running it.
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        cluster = LocalCluster(n_workers=2, threads_per_worker=2, processes=True, dashboard_address=None)
    try:
        yield cluster
    finally:
        cluster.close(timeout=20)


def _read_until(proc: subprocess.Popen[str], pattern: str, timeout: float) -> re.Match[str]:
    """Read the process's stderr (in a thread: no buffering surprises) until ``pattern``."""
    import queue
    import threading

    assert proc.stderr is not None
    lines: queue.Queue[str] = queue.Queue()
    stream = proc.stderr

    def pump() -> None:
        for line in stream:
            lines.put(line)
        lines.put("")

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while True:
        try:
            line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            break
        if not line:
            break
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match
        if time.monotonic() > deadline:
            break
    raise AssertionError(f"{pattern!r} not seen within {timeout}s; output:\n{''.join(seen)}")


def _kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


@pytest.fixture
def cli_cluster() -> Iterator[dict[str, Any]]:
    """``dask scheduler --host 127.0.0.1 --port 0`` and one ``dask worker``, as separate processes."""
    if not DASK.exists():
        pytest.skip(f"the dask CLI is not installed next to {sys.executable}")
    env = {**os.environ, "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}
    scheduler = subprocess.Popen(
        [str(DASK), "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, start_new_session=True, env=env,
    )
    procs = [scheduler]
    try:
        address = _read_until(scheduler, r"Scheduler at:\s+(tcp://\S+)", 60).group(1)
        worker = subprocess.Popen(
            [str(DASK), "worker", address, "--no-nanny", "--nthreads", "2", "--no-dashboard",
             "--host", "127.0.0.1"],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, start_new_session=True, env=env,
        )
        procs.append(worker)
        _read_until(worker, r"Registered to:", 60)
        yield {"address": address, "scheduler": scheduler, "worker": worker}
    finally:
        for proc in reversed(procs):
            _kill(proc)
