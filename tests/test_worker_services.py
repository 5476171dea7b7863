"""What every worker service does alike, run against the real services in subprocesses."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from wove.environment import DeliveryTimeoutError, ExecutorRuntime
from wove.testing import WorkerProcess, tasks

pytestmark = pytest.mark.integration

SERVICES = {"http": "url", "grpc": "target", "websocket": "url"}
MiB = 1024 * 1024


@pytest.fixture(params=sorted(SERVICES))
def worker(request: pytest.FixtureRequest) -> Iterator[WorkerProcess]:
    process = WorkerProcess(request.param)
    process.start()
    try:
        yield process
    finally:
        process.kill()


def _environment(worker: WorkerProcess, **delivery: Any) -> dict[str, Any]:
    return {"w": {"executor": worker.service, "executor_config": {SERVICES[worker.service]: worker.address},
                  **delivery}}


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_a_stuck_sync_task_does_not_keep_the_service_alive(worker: WorkerProcess) -> None:
    async with ExecutorRuntime(_environment(worker, delivery_timeout=0.5), {}) as runtime:
        with pytest.raises(DeliveryTimeoutError):
            await runtime.call("w", tasks.blocking_sleep, 3600)
    assert worker.proc is not None
    worker.proc.send_signal(signal.SIGTERM)
    try:
        code = worker.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"wove worker {worker.service} still runs 30 s after SIGTERM; stderr: {worker.stderr[-2000:]}")
    assert code == 0, worker.stderr[-2000:]
    assert "Traceback" not in worker.stderr, worker.stderr[-2000:]


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmRSS from /proc")
async def test_large_results_do_not_stay_resident(worker: WorkerProcess) -> None:
    assert worker.proc is not None
    async with ExecutorRuntime(_environment(worker, delivery_timeout=60), {}) as runtime:
        await runtime.call("w", tasks.blob, MiB)  # warm up: imports, buffers, first connection
        before = _rss(worker.proc.pid)
        for _ in range(10):
            result = await runtime.call("w", tasks.blob, 20 * MiB)
            assert len(result) == 20 * MiB
            del result
        await asyncio.sleep(0.5)
        grown = _rss(worker.proc.pid) - before
    # ten 20 MiB results went through; the worker keeps at most its 32 MiB result bound
    # (plus allocator slack), not all of them
    assert grown < 100 * MiB, f"worker RSS grew by {grown / MiB:.0f} MiB"
