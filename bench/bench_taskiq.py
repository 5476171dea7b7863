"""Wove's taskiq environment vs raw taskiq (kiq + wait_result) on the same taskiq workers.

Run: ``uv run --no-sync python bench/bench_taskiq.py [--tasks 500] [--workers 2]``
(needs Redis at 127.0.0.1:6379; uses database 5 and a queue of its own, deleted after).

Both sides use the same ``taskiq worker`` (``--workers`` child processes) on a taskiq-redis
``ListQueueBroker`` with a ``RedisAsyncResultBackend``, and the same sync no-op body,
``wove.testing.tasks.add``: raw taskiq runs it through a plain task ``raw_add`` registered
next to Wove's. Raw taskiq kicks every task, then awaits each
``wait_result(check_interval=0.01)``. Each round runs raw taskiq and Wove back to back,
alternating which goes first; the best of the rounds is kept. Prints the per-task cost of
no-op tasks, all submitted at once and one at a time, with ratios (target: within 2x of
raw taskiq). ``--config '{"result_channel": "engine"}'`` adds executor_config keys on
Wove's side.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
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

TASKIQ = Path(sys.executable).with_name("taskiq")
TASKS = """\
from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend
from wove.testing import tasks
from wove_executor_taskiq.worker import register

broker = ListQueueBroker({url!r}, queue_name={queue!r}).with_result_backend(RedisAsyncResultBackend({url!r}))
register(broker)


@broker.task(task_name="raw_add")
def raw_add(a: int, b: int) -> int:
    return tasks.add(a, b)
"""


async def _raw_batch(raw_add: Any, args: list[tuple[int, int]]) -> float:
    start = time.perf_counter()
    sent = [await raw_add.kiq(a, b) for a, b in args]
    results = [(await task.wait_result(check_interval=0.01, timeout=60)).return_value for task in sent]
    assert results == [a + b for a, b in args]
    return time.perf_counter() - start


async def _raw_serial(raw_add: Any, args: list[tuple[int, int]]) -> float:
    start = time.perf_counter()
    for a, b in args:
        task = await raw_add.kiq(a, b)
        assert (await task.wait_result(check_interval=0.01, timeout=60)).return_value == a + b
    return time.perf_counter() - start


async def _wove_batch(runtime: ExecutorRuntime, args: list[tuple[int, int]]) -> float:
    start = time.perf_counter()
    results = await asyncio.gather(*(runtime.call("taskiq", tasks.add, a, b) for a, b in args))
    assert results == [a + b for a, b in args]
    return time.perf_counter() - start


async def _wove_serial(runtime: ExecutorRuntime, args: list[tuple[int, int]]) -> float:
    start = time.perf_counter()
    for a, b in args:
        assert await runtime.call("taskiq", tasks.add, a, b) == a + b
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


def _start_worker(folder: Path, workers: int) -> tuple[subprocess.Popen[bytes], Path]:
    log = folder / "worker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(TASKIQ), "worker", "bench_taskiq_tasks:broker", "--workers", str(workers),
                                 "--log-level", "INFO"], cwd=folder, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc, log


async def main(n_tasks: int, serial: int, workers: int, rounds: int, url: str, extra: dict[str, Any]) -> None:
    from redis.asyncio import Redis

    queue = f"bench-{uuid.uuid4().hex[:8]}"
    folder = Path(tempfile.mkdtemp(prefix="bench-taskiq-"))
    (folder / "bench_taskiq_tasks.py").write_text(TASKS.format(url=url, queue=queue))
    proc, log = _start_worker(folder, workers)
    deadline = time.monotonic() + 30
    while log.read_text(errors="replace").count("Listening started") < workers:
        assert time.monotonic() < deadline and proc.poll() is None, log.read_text(errors="replace")
        await asyncio.sleep(0.05)
    sys.path.insert(0, str(folder))
    module = importlib.import_module("bench_taskiq_tasks")
    await module.broker.startup()
    definition = {"executor": "taskiq", "executor_config": {"broker": module.broker, **extra}}
    batch = [(i, 1) for i in range(n_tasks)]
    one_by_one = [(i, 2) for i in range(serial)]
    try:
        async with ExecutorRuntime({"taskiq": definition}, {}) as runtime:
            for _ in range(2):  # warm up both paths
                await _raw_batch(module.raw_add, batch[:50])
                await _wove_batch(runtime, batch[:50])
            raw_batch, wove_batch = await _best_of(rounds, lambda: _raw_batch(module.raw_add, batch),
                                                   lambda: _wove_batch(runtime, batch))
            raw_serial, wove_serial = await _best_of(rounds, lambda: _raw_serial(module.raw_add, one_by_one),
                                                     lambda: _wove_serial(runtime, one_by_one))
    finally:
        await module.broker.shutdown()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
        redis = Redis.from_url(url)
        await redis.flushdb()  # database 5 is the taskiq tests' and benchmark's own
        await redis.aclose()
    print(f"taskiq: 1 worker with {workers} child processes (ListQueueBroker + RedisAsyncResultBackend); "
          f"wove executor_config extras {extra}; best of {rounds} alternating rounds")
    print(f"no-op x{n_tasks} at once: raw taskiq {raw_batch / n_tasks * 1e3:.2f} ms/task, wove "
          f"{wove_batch / n_tasks * 1e3:.2f} ms/task, ratio {wove_batch / raw_batch:.2f}x (target <= 2x)")
    print(f"no-op x{serial} one at a time: raw taskiq {raw_serial / serial * 1e3:.2f} ms/task, wove "
          f"{wove_serial / serial * 1e3:.2f} ms/task, ratio {wove_serial / raw_serial:.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=500)
    parser.add_argument("--serial", type=int, default=50, help="tasks run one at a time")
    parser.add_argument("--workers", type=int, default=2, help="worker child processes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/5")
    parser.add_argument("--config", type=json.loads, default={}, help="more executor_config for Wove, as JSON")
    ns = parser.parse_args()
    asyncio.run(main(ns.tasks, ns.serial, ns.workers, ns.rounds, ns.redis_url, ns.config))
