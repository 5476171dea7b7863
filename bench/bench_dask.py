"""Wove's dask environment vs raw Dask (client.submit + gather) on one LocalCluster.

Run: ``uv run --no-sync python bench/bench_dask.py [--tasks 500] [--cpu-tasks 8] [--burn 3000000]``.

Both sides use the same LocalCluster (same worker processes and threads). Each round runs
raw Dask and Wove back to back, alternating which goes first, and the best of the rounds
is kept, so a noisy machine inflates both sides alike. Prints per-task cost for no-op
tasks and wall time for CPU-bound tasks (several tasks per worker thread, each long
enough that the ratio shows Wove's overhead, not scheduling noise), with ratios
(targets: no-op within 2x of raw Dask, CPU-bound within 1.2x).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from wove.environment import ExecutorRuntime
from wove.testing import tasks


async def _raw(client: Any, func: Any, args: list[tuple[Any, ...]]) -> float:
    start = time.perf_counter()
    futures = [client.submit(func, *a, pure=False) for a in args]
    await client.gather(futures)
    elapsed = time.perf_counter() - start
    del futures
    return elapsed


async def _wove(runtime: ExecutorRuntime, func: Any, args: list[tuple[Any, ...]]) -> float:
    start = time.perf_counter()
    await asyncio.gather(*(runtime.call("dask", func, *a) for a in args))
    return time.perf_counter() - start


async def _best_of(rounds: int, raw: Callable[[], Awaitable[float]],
                   wove: Callable[[], Awaitable[float]]) -> tuple[float, float]:
    """Best raw and Wove times over ``rounds`` alternating rounds."""
    raw_times: list[float] = []
    wove_times: list[float] = []
    for i in range(rounds):
        if i % 2 == 0:
            raw_times.append(await raw())
            wove_times.append(await wove())
        else:
            wove_times.append(await wove())
            raw_times.append(await raw())
        await asyncio.sleep(0.2)  # let the cluster release the round's keys
    return min(raw_times), min(wove_times)


async def main(n_tasks: int, cpu_tasks: int, burn: int, workers: int, threads: int, rounds: int) -> None:
    from distributed import Client, LocalCluster

    # dashboard_address=None alone still binds the scheduler's HTTP endpoints on port 8787
    cluster = await LocalCluster(asynchronous=True, n_workers=workers, threads_per_worker=threads,
                                 processes=True, dashboard_address=None,
                                 scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"})
    client = await Client(cluster, asynchronous=True)
    definition = {"executor": "dask", "executor_config": {"address": cluster.scheduler_address}}
    cpu_tasks = cpu_tasks or 2 * workers * threads
    try:
        async with ExecutorRuntime({"dask": definition}, {}) as runtime:
            noop_args = [(i, 0) for i in range(n_tasks)]
            cpu_args = [(burn,) for _ in range(cpu_tasks)]
            # warm up both paths (worker imports, connections)
            for _ in range(2):
                await _raw(client, tasks.add, noop_args[:100])
                await _wove(runtime, tasks.add, noop_args[:100])
            raw_noop, wove_noop = await _best_of(rounds, lambda: _raw(client, tasks.add, noop_args),
                                                 lambda: _wove(runtime, tasks.add, noop_args))
            raw_cpu, wove_cpu = await _best_of(rounds, lambda: _raw(client, tasks.burn, cpu_args),
                                               lambda: _wove(runtime, tasks.burn, cpu_args))
    finally:
        await client.close()
        await cluster.close()
    print(f"LocalCluster: {workers} worker processes x {threads} threads; best of {rounds} alternating rounds")
    print(f"no-op  x{n_tasks}: raw dask {raw_noop:.3f}s ({raw_noop / n_tasks * 1e3:.2f} ms/task), "
          f"wove {wove_noop:.3f}s ({wove_noop / n_tasks * 1e3:.2f} ms/task), ratio {wove_noop / raw_noop:.2f}x "
          "(target <= 2x)")
    print(f"cpu    x{cpu_tasks} burn({burn}): raw dask {raw_cpu:.3f}s, wove {wove_cpu:.3f}s, "
          f"ratio {wove_cpu / raw_cpu:.2f}x (target <= 1.2x)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=500)
    parser.add_argument("--cpu-tasks", type=int, default=0, help="default: 2 per worker thread")
    parser.add_argument("--burn", type=int, default=3_000_000, help="loop iterations per CPU task")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    ns = parser.parse_args()
    asyncio.run(main(ns.tasks, ns.cpu_tasks, ns.burn, ns.workers, ns.threads, ns.rounds))
