"""Scaling: throughput and the client's CPU per task as runs in flight and stdio processes grow.

For each executor (local, stdio, http, grpc, websocket; our client against our own worker
service), sync no-op tasks driven as N "lanes" that each await one call at a time, for
N = 1, 16, 256 and 4,096 runs in flight; and the stdio executor with 1, 2 and 4 worker
processes at 256 in flight, on no-op tasks and on CPU-bound tasks (``tasks.burn``).

Columns: tasks/s, and the client's own CPU per task (user + system of this process, all
its threads; a worker process's CPU is not in it). Run:
``uv run --no-sync python bench/bench_scaling.py`` (``--executors local,stdio``,
``--in-flight 1,16,256``, ``--min-tasks N``, ``--repeat N``). The table goes to
docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from wove.environment import ExecutorRuntime
from wove.testing import WorkerProcess, tasks

EXECUTORS = ("local", "stdio", "http", "grpc", "websocket")


@contextmanager
def environment(executor: str, processes: int = 1) -> Iterator[dict[str, Any]]:
    if executor == "local":
        yield {"executor": "local"}
    elif executor == "stdio":
        yield {"executor": "stdio", "executor_config": {"processes": processes}}
    else:
        with WorkerProcess(executor, "--max-concurrency", "8192") as worker:
            key = "target" if executor == "grpc" else "url"
            yield {"executor": executor, "executor_config": {key: worker.address}}


async def drive(definition: dict[str, Any], in_flight: int, total: int, fn: Any, *args: Any) -> tuple[float, float]:
    """``total`` calls of ``fn`` over ``in_flight`` lanes: (tasks/s, client CPU µs per task)."""
    async with ExecutorRuntime({"e": definition}) as runtime:
        await asyncio.gather(*(runtime.call("e", fn, *args) for _ in range(min(in_flight, 64))))  # warm

        async def lane(count: int) -> None:
            for _ in range(count):
                await runtime.call("e", fn, *args)

        per_lane = max(total // in_flight, 1)
        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(lane(per_lane) for _ in range(in_flight)))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        done = per_lane * in_flight
        return done / wall, cpu / done * 1e6


def measure(definition: dict[str, Any], in_flight: int, total: int, repeat: int, fn: Any,
            *args: Any) -> tuple[float, float]:
    runs = [asyncio.run(drive(definition, in_flight, total, fn, *args)) for _ in range(repeat)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--executors", default=",".join(EXECUTORS))
    parser.add_argument("--in-flight", default="1,16,256,4096")
    parser.add_argument("--min-tasks", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--processes", default="1,2,4")
    parser.add_argument("--burn", type=int, default=200_000, help="loop iterations of one CPU-bound task")
    args = parser.parse_args()
    levels = [int(n) for n in args.in_flight.split(",")]
    print(f"sync no-op tasks, median of {args.repeat}; cells: tasks/s / client CPU µs per task "
          f"({os.cpu_count()} cores, Python {sys.version.split()[0]})")
    print("| executor | " + " | ".join(f"{n} in flight" for n in levels) + " |")
    print("|---|" + "---|" * len(levels))
    for executor in args.executors.split(","):
        cells = []
        with environment(executor) as definition:
            for in_flight in levels:
                total = max(args.min_tasks, 2 * in_flight)
                if in_flight == 1:
                    total = max(args.min_tasks // 4, 200)
                rate, cpu = measure(definition, in_flight, total, args.repeat, tasks.add, 1, 1)
                cells.append(f"{rate:,.0f} / {cpu:.0f}")
        print(f"| {executor} | " + " | ".join(cells) + " |")
    if "stdio" in args.executors.split(","):
        print(f"\nstdio worker processes, 256 in flight (no-op: tasks/s / client CPU µs per task; "
              f"CPU-bound burn({args.burn}): tasks/s)")
        print("| processes | no-op | CPU-bound |")
        print("|---|---|---|")
        for processes in (int(p) for p in args.processes.split(",")):
            with environment("stdio", processes) as definition:
                rate, cpu = measure(definition, 256, args.min_tasks, args.repeat, tasks.add, 1, 1)
                burn_rate, _ = measure(definition, 256, 256, args.repeat, tasks.burn, args.burn)
            print(f"| {processes} | {rate:,.0f} / {cpu:.0f} | {burn_rate:,.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
