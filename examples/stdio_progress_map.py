"""A CPU-bound map over a pool of stdio worker processes, with progress.

Counts the primes below each of 48 limits on 2 worker subprocesses (``processes``): each
call runs in a worker process, so they use both cores, unlike threads. On a terminal,
``progress=True`` draws a bar (it needs tqdm: ``pip install "wove-core[progress]"``);
elsewhere (a pipe, a CI log) this program passes a callable that prints a line at every
quarter instead.

Run it: ``uv run python examples/stdio_progress_map.py`` (from a checkout), or
``python stdio_progress_map.py`` with ``wove-executor-stdio`` installed.
"""

from __future__ import annotations

import asyncio
import sys
import time

from wove.environment import ExecutorRuntime, MapProgress


def count_primes(limit: int) -> int:
    """CPU-bound on purpose: trial division, no shortcuts."""
    return sum(1 for n in range(2, limit) if all(n % d for d in range(2, int(n**0.5) + 1)))


class QuarterReport:
    """A progress callable: called as runs finish, and once more at the end; prints each quarter once."""

    def __init__(self) -> None:
        self.shown = 0

    def __call__(self, progress: MapProgress) -> None:
        finished = progress.done + progress.failed
        quarter = 4 * finished // progress.total if progress.total else 0
        if quarter > self.shown:
            self.shown = quarter
            print(f"{finished}/{progress.total} finished ({progress.failed} failed), "
                  f"{progress.in_flight} in flight, {progress.elapsed:.1f} s", flush=True)


async def main() -> None:
    environments = {"cpu": {"executor": "stdio", "executor_config": {"processes": 2},
                            "delivery_timeout": 60}}
    limits = [20_000 + 500 * i for i in range(48)]
    progress = True if sys.stderr.isatty() else QuarterReport()
    async with ExecutorRuntime(environments) as runtime:
        started = time.perf_counter()
        counts = [n async for n in runtime.map("cpu", count_primes, limits, progress=progress)]
        elapsed = time.perf_counter() - started
    assert counts[0] == count_primes(limits[0])  # the same answer as in this process
    print(f"{len(counts)} limits, {sum(counts)} primes counted in {elapsed:.2f} s on 2 worker processes")


if __name__ == "__main__":
    asyncio.run(main())
