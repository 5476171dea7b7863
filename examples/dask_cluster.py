"""Tasks on a Dask cluster: an embedded LocalCluster of 2 worker processes.

Without ``address`` the ``dask`` executor starts a ``LocalCluster`` with the environment
and stops it with it; give ``"address": "tcp://scheduler:8786"`` to use a running
cluster instead (its workers need ``wove-executor-dask`` installed, and must be able to
import your task functions' modules, or the functions must be defined in ``__main__``,
which is pickled by value).

Dask starts the embedded cluster's worker processes with ``multiprocessing``'s ``spawn``,
which imports this script again in each of them: everything that starts the runtime
must be under ``if __name__ == "__main__":`` (without the guard, the executor raises
``MainGuardError`` saying so, before any worker starts).

Run it: ``uv run python examples/dask_cluster.py``, or ``python dask_cluster.py`` with
``wove-executor-dask`` installed.
"""

from __future__ import annotations

import asyncio
import logging
import os

from wove.environment import ExecutorRuntime


def simulate(seed: int) -> tuple[int, float, int]:
    """A small Monte Carlo estimate of pi; returns (seed, estimate, worker pid)."""
    import random

    rng = random.Random(seed)
    inside = sum(1 for _ in range(20_000) if rng.random() ** 2 + rng.random() ** 2 <= 1.0)
    return seed, 4 * inside / 20_000, os.getpid()


async def main() -> None:
    environments = {
        "cluster": {
            "executor": "dask",
            "executor_config": {"n_workers": 2, "threads_per_worker": 1, "processes": True},
            "delivery_timeout": 120,
        },
    }
    async with ExecutorRuntime(environments) as runtime:
        results = [result async for result in runtime.map("cluster", simulate, range(16))]
    estimate = sum(r[1] for r in results) / len(results)
    pids = {r[2] for r in results}
    print(f"pi is about {estimate:.3f}, from {len(results)} tasks on {len(pids)} worker process(es); "
          f"this process is {os.getpid()}, not among them: {os.getpid() not in pids}")


if __name__ == "__main__":
    logging.getLogger("distributed").setLevel(logging.ERROR)  # Dask logs its cluster's lifecycle at INFO
    asyncio.run(main())
