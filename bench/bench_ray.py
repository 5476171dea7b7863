"""Wove's ray environment vs raw Ray (``ray.get(f.remote())``) on one local Ray.

Run: ``uv run --no-sync python bench/bench_ray.py [--calls 300] [--tasks 1000] [--cpu-tasks 8]``.

Both sides use the same Ray (started here by ``ray.init(num_cpus=...)``, loopback only) and
the same functions (``wove.testing.tasks.add`` and ``burn``, which the workers import).
Each round runs raw Ray and Wove back to back, alternating which goes first, and the best
round is kept, so a noisy machine inflates both sides alike. Printed:

* sequential no-op calls: one at a time, ``ray.get(add.remote(i, 0))`` vs ``await
  runtime.call("ray", add, i, 0)`` (the per-call latency of the issue's target: within 2x);
* no-op throughput: ``ray.get([add.remote(...) ...])`` vs ``asyncio.gather`` of calls;
* CPU-bound wall time: ``cpu_tasks`` x ``burn(n)`` on ``num_cpus`` CPUs (target: within 1.2x).

Wove runs with each ``result_channel``: ``auto`` (the default: the worker posts the outcome
to the callback server and also returns a small status through the ObjectRef) and
``engine`` (the outcome travels only in the ObjectRef).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

# A loopback-only local Ray without token auth (which would write ~/.ray/auth_token), and
# workers from this environment even under `uv run` (see wove-executor-ray's README).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from wove.environment import ExecutorRuntime
from wove.testing import tasks


async def _best_of(rounds: int, raw: Callable[[], Awaitable[float]],
                   wove: Callable[[], Awaitable[float]]) -> tuple[float, float]:
    raw_times: list[float] = []
    wove_times: list[float] = []
    for i in range(rounds):
        first, second = (raw, wove) if i % 2 == 0 else (wove, raw)
        a = await first()
        b = await second()
        raw_times.append(a if first is raw else b)
        wove_times.append(b if first is raw else a)
    return min(raw_times), min(wove_times)


def _raw_sequential(remote: Any, calls: int) -> float:
    import ray

    start = time.perf_counter()
    for i in range(calls):
        ray.get(remote.remote(i, 0))
    return time.perf_counter() - start


def _raw_batch(remote: Any, args: list[tuple[Any, ...]]) -> float:
    import ray

    start = time.perf_counter()
    ray.get([remote.remote(*a) for a in args])
    return time.perf_counter() - start


async def _wove_sequential(runtime: ExecutorRuntime, calls: int) -> float:
    start = time.perf_counter()
    for i in range(calls):
        await runtime.call("ray", tasks.add, i, 0)
    return time.perf_counter() - start


async def _wove_batch(runtime: ExecutorRuntime, func: Any, args: list[tuple[Any, ...]]) -> float:
    start = time.perf_counter()
    await asyncio.gather(*(runtime.call("ray", func, *a) for a in args))
    return time.perf_counter() - start


async def main(calls: int, n_tasks: int, cpu_tasks: int, burn: int, cpus: int, rounds: int) -> None:
    import ray

    temp_dir = tempfile.mkdtemp(prefix="wove-ray-bench-")
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
             _temp_dir=temp_dir)
    add = ray.remote(max_retries=0)(tasks.add)
    burn_remote = ray.remote(max_retries=0)(tasks.burn)
    noop_args = [(i, 0) for i in range(n_tasks)]
    cpu_args = [(burn,) for _ in range(cpu_tasks)]
    rows: list[tuple[str, str, float, float]] = []
    try:
        for channel in ("auto", "engine"):
            definition = {"executor": "ray", "executor_config": {"result_channel": channel}}
            async with ExecutorRuntime({"ray": definition}, {}) as runtime:
                for _ in range(2):  # warm up: worker processes, imports, connections
                    await asyncio.to_thread(_raw_batch, add, noop_args[:100])
                    await _wove_batch(runtime, tasks.add, noop_args[:100])
                raw, wove = await _best_of(rounds, lambda: asyncio.to_thread(_raw_sequential, add, calls),
                                           lambda: _wove_sequential(runtime, calls))
                rows.append((channel, f"no-op, sequential ({calls} calls)", raw / calls * 1e3, wove / calls * 1e3))
                raw, wove = await _best_of(rounds, lambda: asyncio.to_thread(_raw_batch, add, noop_args),
                                           lambda: _wove_batch(runtime, tasks.add, noop_args))
                rows.append((channel, f"no-op, {n_tasks} at once", raw / n_tasks * 1e3, wove / n_tasks * 1e3))
                raw, wove = await _best_of(rounds, lambda: asyncio.to_thread(_raw_batch, burn_remote, cpu_args),
                                           lambda: _wove_batch(runtime, tasks.burn, cpu_args))
                rows.append((channel, f"CPU-bound, {cpu_tasks} x burn({burn}) wall", raw * 1e3, wove * 1e3))
    finally:
        ray.shutdown()
        import shutil

        shutil.rmtree(temp_dir, ignore_errors=True)
    print(f"Ray {ray.__version__}, Python {sys.version.split()[0]}, {cpus} CPUs for Ray, {os.cpu_count()} cores; "
          f"best of {rounds} alternating rounds")
    print(f"{'result_channel':<15} {'workload':<42} {'raw Ray ms':>11} {'Wove ms':>9} {'ratio':>6}")
    for channel, label, raw_ms, wove_ms in rows:
        print(f"{channel:<15} {label:<42} {raw_ms:>11.3f} {wove_ms:>9.3f} {wove_ms / raw_ms:>5.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300, help="sequential no-op calls per round")
    parser.add_argument("--tasks", type=int, default=1000, help="no-op tasks submitted at once per round")
    parser.add_argument("--cpu-tasks", type=int, default=8, help="CPU-bound tasks per round")
    parser.add_argument("--burn", type=int, default=3_000_000, help="iterations of each CPU-bound task")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    asyncio.run(main(options.calls, options.tasks, options.cpu_tasks, options.burn, options.cpus, options.rounds))
