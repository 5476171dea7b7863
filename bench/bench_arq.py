"""Wove's arq environment vs raw arq (enqueue_job + Job.result()) on the same arq workers.

Run: ``uv run --no-sync python bench/bench_arq.py [--tasks 500] [--workers 2] [--poll-delay 0.02]``
(needs Redis at 127.0.0.1:6379; uses database 4 and a queue of its own, deleted after).

Both sides use the same arq worker processes (``wove_executor_arq.worker.worker_settings``
with the given ``poll_delay`` and ``max_jobs``), and the same sync no-op body,
``wove.testing.tasks.add``: raw arq runs it through a plain arq function ``raw_add``
registered next to Wove's. Raw arq enqueues every job, then awaits each job's
``result(poll_delay=...)`` (the same poll delay as the workers'). Each round runs raw arq
and Wove back to back, alternating which goes first; the best of the rounds is kept.
Prints the per-task cost of no-op tasks, all submitted at once and one at a time, with
ratios (target: within 2x of raw arq). ``--config '{"result_channel": "engine"}'`` adds
executor_config keys on Wove's side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from wove.environment import ExecutorRuntime
from wove.testing import tasks

ARQ = Path(sys.executable).with_name("arq")
SETTINGS = """\
from arq.connections import RedisSettings
from wove.testing import tasks
from wove_executor_arq.worker import worker_settings


async def raw_add(ctx, a, b):
    return tasks.add(a, b)

WorkerSettings = worker_settings(redis_settings=RedisSettings.from_dsn({url!r}), queue_name={queue!r},
                                 poll_delay={poll_delay!r}, max_jobs={max_jobs!r}, functions=[raw_add])
"""


async def _raw_batch(pool: Any, queue: str, args: list[tuple[int, int]], poll: float) -> float:
    start = time.perf_counter()
    jobs = [await pool.enqueue_job("raw_add", a, b, _queue_name=queue) for a, b in args]
    results = [await job.result(poll_delay=poll) for job in jobs]
    assert results == [a + b for a, b in args]
    return time.perf_counter() - start


async def _raw_serial(pool: Any, queue: str, args: list[tuple[int, int]], poll: float) -> float:
    start = time.perf_counter()
    for a, b in args:
        job = await pool.enqueue_job("raw_add", a, b, _queue_name=queue)
        assert await job.result(poll_delay=poll) == a + b
    return time.perf_counter() - start


async def _wove_batch(runtime: ExecutorRuntime, args: list[tuple[int, int]]) -> float:
    start = time.perf_counter()
    results = await asyncio.gather(*(runtime.call("arq", tasks.add, a, b) for a, b in args))
    assert results == [a + b for a, b in args]
    return time.perf_counter() - start


async def _wove_serial(runtime: ExecutorRuntime, args: list[tuple[int, int]]) -> float:
    start = time.perf_counter()
    for a, b in args:
        assert await runtime.call("arq", tasks.add, a, b) == a + b
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


def _start_workers(folder: Path, count: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([str(ARQ), "bench_arq_settings.WorkerSettings"], cwd=folder,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            for _ in range(count)]


async def main(n_tasks: int, serial: int, workers: int, poll: float, max_jobs: int, rounds: int, url: str,
               extra: dict[str, Any]) -> None:
    from arq.connections import RedisSettings, create_pool

    queue = f"bench-{uuid.uuid4().hex[:8]}"
    folder = Path(tempfile.mkdtemp(prefix="bench-arq-"))
    (folder / "bench_arq_settings.py").write_text(SETTINGS.format(url=url, queue=queue, poll_delay=poll,
                                                                  max_jobs=max_jobs))
    procs = _start_workers(folder, workers)
    pool = await create_pool(RedisSettings.from_dsn(url))
    deadline = time.monotonic() + 30
    while not await pool.exists(f"{queue}:health-check"):
        assert time.monotonic() < deadline, "the arq workers did not start"
        await asyncio.sleep(0.05)
    definition = {"executor": "arq", "executor_config": {"pool": pool, "queue_name": queue, **extra}}
    batch = [(i, 1) for i in range(n_tasks)]
    one_by_one = [(i, 2) for i in range(serial)]
    try:
        async with ExecutorRuntime({"arq": definition}, {}) as runtime:
            for _ in range(2):  # warm up both paths
                await _raw_batch(pool, queue, batch[:50], poll)
                await _wove_batch(runtime, batch[:50])
            raw_batch, wove_batch = await _best_of(rounds, lambda: _raw_batch(pool, queue, batch, poll),
                                                   lambda: _wove_batch(runtime, batch))
            raw_serial, wove_serial = await _best_of(rounds, lambda: _raw_serial(pool, queue, one_by_one, poll),
                                                     lambda: _wove_serial(runtime, one_by_one))
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=20)
        keys = [key async for key in pool.scan_iter("arq:*", count=1000)]
        keys += [key async for key in pool.scan_iter(f"{queue}*")]
        for start in range(0, len(keys), 500):
            await pool.delete(*keys[start:start + 500])
        await pool.aclose()
    print(f"arq: {workers} workers, poll_delay {poll} s, max_jobs {max_jobs}; wove executor_config extras {extra}; "
          f"best of {rounds} alternating rounds")
    print(f"no-op x{n_tasks} at once: raw arq {raw_batch / n_tasks * 1e3:.2f} ms/task, wove "
          f"{wove_batch / n_tasks * 1e3:.2f} ms/task, ratio {wove_batch / raw_batch:.2f}x (target <= 2x)")
    print(f"no-op x{serial} one at a time: raw arq {raw_serial / serial * 1e3:.2f} ms/task, wove "
          f"{wove_serial / serial * 1e3:.2f} ms/task, ratio {wove_serial / raw_serial:.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=500)
    parser.add_argument("--serial", type=int, default=50, help="tasks run one at a time")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--poll-delay", type=float, default=0.02, help="the workers' and raw result()'s poll delay")
    parser.add_argument("--max-jobs", type=int, default=32, help="jobs each worker runs at once")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/4")
    parser.add_argument("--config", type=json.loads, default={}, help="more executor_config for Wove, as JSON")
    ns = parser.parse_args()
    asyncio.run(main(ns.tasks, ns.serial, ns.workers, ns.poll_delay, ns.max_jobs, ns.rounds, ns.redis_url,
                     ns.config))
