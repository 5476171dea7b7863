"""Wove's rq environment vs raw RQ (Queue.enqueue + the job's result) on the same rq workers.

Run: ``uv run --no-sync python bench/bench_rq.py [--tasks 500] [--workers 2] [--simple]``
(needs Redis at 127.0.0.1:6379; uses database 3 and a queue of its own, deleted after).

Both sides use the same ``rq worker`` processes (``wove_executor_rq.worker.Worker``, a
work horse forked per job; ``--simple``: ``wove_executor_rq.worker.SimpleWorker``, jobs in
the worker process) and the same function, ``wove.testing.tasks.add``. Raw RQ enqueues
every job, then waits for each job's result (``Job.latest_result(timeout=...)``, a
blocking read of RQ's result stream). Each round runs raw RQ and Wove back to back,
alternating which goes first, and the best of the rounds is kept, so a noisy machine
inflates both sides alike. Prints the per-task cost of no-op tasks, all submitted at once
and one at a time, with ratios (target: within 2x of raw RQ).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from wove.environment import ExecutorRuntime
from wove.testing import tasks

RQ = Path(sys.executable).with_name("rq")


def _raw_batch(queue: Any, args: list[tuple[int, int]]) -> float:
    start = time.perf_counter()
    jobs = [queue.enqueue("wove.testing.tasks.add", a, b) for a, b in args]
    for job in jobs:
        result = job.latest_result(timeout=60)
        assert result is not None and result.return_value == job.args[0] + job.args[1], result
    return time.perf_counter() - start


def _raw_serial(queue: Any, args: list[tuple[int, int]]) -> float:
    start = time.perf_counter()
    for a, b in args:
        result = queue.enqueue("wove.testing.tasks.add", a, b).latest_result(timeout=60)
        assert result is not None and result.return_value == a + b, result
    return time.perf_counter() - start


async def _wove_batch(runtime: ExecutorRuntime, args: list[tuple[int, int]]) -> float:
    start = time.perf_counter()
    results = await asyncio.gather(*(runtime.call("rq", tasks.add, a, b) for a, b in args))
    assert results == [a + b for a, b in args]
    return time.perf_counter() - start


async def _wove_serial(runtime: ExecutorRuntime, args: list[tuple[int, int]]) -> float:
    start = time.perf_counter()
    for a, b in args:
        assert await runtime.call("rq", tasks.add, a, b) == a + b
    return time.perf_counter() - start


async def _best_of(rounds: int, raw: Callable[[], Awaitable[float]],
                   wove: Callable[[], Awaitable[float]]) -> tuple[float, float]:
    raw_times: list[float] = []
    wove_times: list[float] = []
    for i in range(rounds):
        pair = (raw, wove) if i % 2 == 0 else (wove, raw)
        for side in pair:
            (raw_times if side is raw else wove_times).append(await side())
    return min(raw_times), min(wove_times)


def _start_workers(url: str, queue: str, count: int, worker_class: str) -> list[subprocess.Popen[bytes]]:
    from redis import Redis

    names = [f"bench-{uuid.uuid4().hex[:10]}" for _ in range(count)]
    procs = [subprocess.Popen([str(RQ), "worker", "--url", url, "--worker-class", worker_class, "--name", name,
                               "--logging_level", "WARNING", queue],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
             for name in names]
    connection = Redis.from_url(url)
    deadline = time.monotonic() + 30
    for name in names:
        channel = f"rq:pubsub:{name}"
        while dict(connection.pubsub_numsub(channel)).get(channel.encode(), 0) == 0:
            if time.monotonic() > deadline:
                raise RuntimeError("the rq workers did not start")
            time.sleep(0.05)
    connection.close()
    return procs


async def main(n_tasks: int, serial: int, workers: int, simple: bool, rounds: int, url: str,
               extra: dict[str, Any]) -> None:
    from redis import Redis
    from rq import Queue

    queue_name = f"bench-{uuid.uuid4().hex[:8]}"
    worker_class = "wove_executor_rq.worker." + ("SimpleWorker" if simple else "Worker")
    procs = _start_workers(url, queue_name, workers, worker_class)
    connection = Redis.from_url(url)
    queue = Queue(queue_name, connection=connection)
    definition = {"executor": "rq", "executor_config": {"redis_url": url, "queue_name": queue_name, **extra}}
    batch = [(i, 1) for i in range(n_tasks)]
    one_by_one = [(i, 2) for i in range(serial)]
    try:
        async with ExecutorRuntime({"rq": definition}, {}) as runtime:
            for _ in range(2):  # warm up both paths
                await asyncio.to_thread(_raw_batch, queue, batch[:50])
                await _wove_batch(runtime, batch[:50])
            raw_batch, wove_batch = await _best_of(rounds, lambda: asyncio.to_thread(_raw_batch, queue, batch),
                                                   lambda: _wove_batch(runtime, batch))
            raw_serial, wove_serial = await _best_of(
                rounds, lambda: asyncio.to_thread(_raw_serial, queue, one_by_one),
                lambda: _wove_serial(runtime, one_by_one))
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=20)
        for pattern in (f"rq:*{queue_name}*", "rq:job:*", "rq:results:*"):
            keys = list(connection.scan_iter(pattern, count=1000))
            for start in range(0, len(keys), 500):
                connection.delete(*keys[start:start + 500])
        connection.close()
    print(f"rq: {workers} x {worker_class}; wove executor_config extras {extra}; best of {rounds} alternating rounds")
    print(f"no-op x{n_tasks} at once: raw rq {raw_batch / n_tasks * 1e3:.2f} ms/task, wove "
          f"{wove_batch / n_tasks * 1e3:.2f} ms/task, ratio {wove_batch / raw_batch:.2f}x (target <= 2x)")
    print(f"no-op x{serial} one at a time: raw rq {raw_serial / serial * 1e3:.2f} ms/task, wove "
          f"{wove_serial / serial * 1e3:.2f} ms/task, ratio {wove_serial / raw_serial:.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=500)
    parser.add_argument("--serial", type=int, default=50, help="tasks run one at a time")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--simple", action="store_true", help="SimpleWorker: no fork per job")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/3")
    parser.add_argument("--config", type=json.loads, default={},
                        help='more executor_config for Wove, as JSON: \'{"result_channel": "engine"}\'')
    ns = parser.parse_args()
    asyncio.run(main(ns.tasks, ns.serial, ns.workers, ns.simple, ns.rounds, ns.redis_url, ns.config))
