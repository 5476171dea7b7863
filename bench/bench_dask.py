"""Wove's dask environment vs raw Dask (client.submit + gather) on one LocalCluster.

Run: ``uv run --no-sync python bench/bench_dask.py [--tasks 500] [--cpu-tasks 16] [--burn 3000000]``.
Prints per-task overhead for no-op tasks and wall time for CPU-bound tasks, with ratios
(targets: no-op overhead within 2x of raw Dask, CPU-bound wall time within 1.2x).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from wove import _testing_tasks as tasks
from wove.environment import ExecutorRuntime


async def _raw(client: Any, func: Any, args: list[tuple[Any, ...]]) -> float:
    start = time.perf_counter()
    futures = [client.submit(func, *a, pure=False) for a in args]
    await client.gather(futures)
    return time.perf_counter() - start


async def _wove(runtime: ExecutorRuntime, func: Any, args: list[tuple[Any, ...]]) -> float:
    start = time.perf_counter()
    await asyncio.gather(*(runtime.call("dask", func, *a) for a in args))
    return time.perf_counter() - start


async def main(n_tasks: int, cpu_tasks: int, burn: int, workers: int, threads: int, rounds: int) -> None:
    from distributed import Client, LocalCluster

    cluster = await LocalCluster(asynchronous=True, n_workers=workers, threads_per_worker=threads,
                                 processes=True, dashboard_address=None)
    client = await Client(cluster, asynchronous=True)
    definition = {"executor": "dask", "executor_config": {"address": cluster.scheduler_address}}
    try:
        async with ExecutorRuntime({"dask": definition}, {}) as runtime:
            noop_args = [(i, 0) for i in range(n_tasks)]
            cpu_args = [(burn,) for _ in range(cpu_tasks)]
            # warm up both paths (worker imports, connections)
            await _raw(client, tasks.add, noop_args[:50])
            await _wove(runtime, tasks.add, noop_args[:50])
            raw_noop = min([await _raw(client, tasks.add, noop_args) for _ in range(rounds)])
            wove_noop = min([await _wove(runtime, tasks.add, noop_args) for _ in range(rounds)])
            raw_cpu = min([await _raw(client, tasks.burn, cpu_args) for _ in range(rounds)])
            wove_cpu = min([await _wove(runtime, tasks.burn, cpu_args) for _ in range(rounds)])
    finally:
        await client.close()
        await cluster.close()
    print(f"LocalCluster: {workers} worker processes x {threads} threads; best of {rounds} rounds")
    print(f"no-op  x{n_tasks}: raw dask {raw_noop:.3f}s ({raw_noop / n_tasks * 1e3:.2f} ms/task), "
          f"wove {wove_noop:.3f}s ({wove_noop / n_tasks * 1e3:.2f} ms/task), ratio {wove_noop / raw_noop:.2f}x "
          "(target <= 2x)")
    print(f"cpu    x{cpu_tasks} burn({burn}): raw dask {raw_cpu:.3f}s, wove {wove_cpu:.3f}s, "
          f"ratio {wove_cpu / raw_cpu:.2f}x (target <= 1.2x)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=500)
    parser.add_argument("--cpu-tasks", type=int, default=8)
    parser.add_argument("--burn", type=int, default=2_000_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    ns = parser.parse_args()
    asyncio.run(main(ns.tasks, ns.cpu_tasks, ns.burn, ns.workers, ns.threads, ns.rounds))
