"""stdio executor benchmark, side by side in one run.

Rows:

* ``ours``          — ``ExecutorRuntime`` + our ``stdio`` executor, one worker process
  (``python -m wove_executor_stdio``);
* ``wove 2.0.3``    — the reference stdio executor and worker, in their own venv;
* ``raw pipe echo`` — a JSON-lines echo over a pipe (the transport's floor: no pickling,
  no runtime);
* ``ProcessPool(2)``— ``concurrent.futures.ProcessPoolExecutor(2)`` via ``run_in_executor``.

Workloads: no-op tasks with 256 in flight (tasks/s), sequential no-op calls (p50 latency),
and CPU-bound tasks on two processes (wall time of our ``processes=2`` pool vs
``ProcessPoolExecutor(2)``). Run: ``uv run --no-sync python bench/bench_stdio.py``
(``--tasks N``, ``--latency-calls N``, ``--repeat N``, ``--skip-wove2``).

Targets: throughput >= 2x wove 2.0.3's stdio; no-op p50 no worse than ProcessPool(2);
CPU-bound wall time within 1.3x of ProcessPool(2).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from wove.testing import tasks

IN_FLIGHT = 256


async def noop() -> None:
    return None


def noop_sync() -> None:
    return None


burn = tasks.burn  # importable in every worker: pickled by reference


def proc_cpu(pids: list[int]) -> float:
    """CPU seconds used so far by the processes ``pids`` (Linux /proc; 0 elsewhere)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


async def _measured(calls: int, make: Any, pids: list[int]) -> tuple[float, float]:
    """Throughput (tasks/s) and CPU microseconds per task (this process + ``pids``)."""
    cpu = time.process_time() + proc_cpu(pids)
    throughput = await _bounded(calls, make)
    return throughput, (time.process_time() + proc_cpu(pids) - cpu) / calls * 1e6


async def _bounded(calls: int, make: Any) -> float:
    """Run ``calls`` coroutines from ``make()`` with IN_FLIGHT at once; return tasks/s."""
    sem = asyncio.Semaphore(IN_FLIGHT)

    async def one() -> None:
        async with sem:
            await make()

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(calls)))
    return calls / (time.perf_counter() - start)


async def _p50(calls: int, make: Any) -> float:
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        await make()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


# -- ours ---------------------------------------------------------------------
async def ours(tasks: int, latency_calls: int) -> tuple[float, float, float]:
    from wove.environment import ExecutorRuntime

    async with ExecutorRuntime({"w": {"executor": "stdio"}}) as rt:
        pids = [w.pid for w in rt._environments["w"].executor._workers]  # type: ignore[attr-defined]
        await _bounded(500, lambda: rt.call("w", noop))  # warm-up
        throughput, cpu = await _measured(tasks, lambda: rt.call("w", noop), pids)
        p50 = await _p50(latency_calls, lambda: rt.call("w", noop))
    return throughput, p50, cpu


async def ours_cpu(jobs: int, n: int) -> float:
    from wove.environment import ExecutorRuntime

    async with ExecutorRuntime({"w": {"executor": "stdio", "executor_config": {"processes": 2}}}) as rt:
        await asyncio.gather(rt.call("w", burn, 10), rt.call("w", burn, 10))
        start = time.perf_counter()
        await asyncio.gather(*(rt.call("w", burn, n) for _ in range(jobs)))
        return time.perf_counter() - start


# -- ProcessPoolExecutor ------------------------------------------------------
async def process_pool(tasks: int, latency_calls: int) -> tuple[float, float, float]:
    loop = asyncio.get_running_loop()
    with concurrent.futures.ProcessPoolExecutor(2) as pool:
        await _bounded(500, lambda: loop.run_in_executor(pool, noop_sync))
        pids = list(pool._processes)  # type: ignore[attr-defined]
        throughput, cpu = await _measured(tasks, lambda: loop.run_in_executor(pool, noop_sync), pids)
        p50 = await _p50(latency_calls, lambda: loop.run_in_executor(pool, noop_sync))
    return throughput, p50, cpu


async def process_pool_cpu(jobs: int, n: int) -> float:
    loop = asyncio.get_running_loop()
    with concurrent.futures.ProcessPoolExecutor(2) as pool:
        await asyncio.gather(loop.run_in_executor(pool, burn, 10), loop.run_in_executor(pool, burn, 10))
        start = time.perf_counter()
        await asyncio.gather(*(loop.run_in_executor(pool, burn, n) for _ in range(jobs)))
        return time.perf_counter() - start


# -- raw JSON-lines echo over a pipe ------------------------------------------
ECHO = "import sys\nfor line in sys.stdin.buffer:\n    sys.stdout.buffer.write(line)\n    sys.stdout.buffer.flush()\n"


async def raw_pipe(tasks: int, latency_calls: int) -> tuple[float, float, float]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", ECHO, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stdout is not None
    waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}

    async def reader() -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            frame = json.loads(line)
            waiting.pop(frame["id"]).set_result(frame)

    reading = asyncio.ensure_future(reader())
    counter = iter(range(10**9))

    async def call() -> dict[str, Any]:
        assert proc.stdin is not None
        ident = next(counter)
        future = asyncio.get_running_loop().create_future()
        waiting[ident] = future
        proc.stdin.write(json.dumps({"type": "run_task", "id": ident}).encode() + b"\n")
        return await future

    try:
        await _bounded(500, call)
        throughput, cpu = await _measured(tasks, call, [proc.pid])
        p50 = await _p50(latency_calls, call)
    finally:
        proc.stdin.close()
        await proc.wait()
        reading.cancel()
    return throughput, p50, cpu


# -- wove 2.0.3 ---------------------------------------------------------------
WOVE2_SCRIPT = textwrap.dedent("""
    import asyncio, json, os, statistics, sys, time
    from wove.environment import ExecutorRuntime

    async def noop():
        return None

    def proc_cpu(pid):
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    async def main(tasks, latency_calls, in_flight):
        rt = ExecutorRuntime({"w": {"executor": "stdio"}}, {})
        await rt.start()
        info = {"environment": "w"}
        call = lambda: rt.run_task(task_name="noop", task_func=noop, task_args={}, task_info=info)
        sem = asyncio.Semaphore(in_flight)
        async def one():
            async with sem:
                await call()
        try:
            await asyncio.gather(*(one() for _ in range(500)))
            pid = rt._executors["w"]._process.pid
            cpu = time.process_time() + proc_cpu(pid)
            start = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(tasks)))
            throughput = tasks / (time.perf_counter() - start)
            cpu = (time.process_time() + proc_cpu(pid) - cpu) / tasks * 1e6
            samples = []
            for _ in range(latency_calls):
                start = time.perf_counter()
                await call()
                samples.append(time.perf_counter() - start)
        finally:
            await rt.stop()
        print(json.dumps({"throughput": throughput, "p50": statistics.median(samples) * 1e6, "cpu": cpu}))

    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
""")


def wove2(tasks: int, latency_calls: int) -> tuple[float, float, float]:
    from _wove2 import wove2_python

    python = wove2_python()
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder) / "wove2_stdio_bench.py"
        script.write_text(WOVE2_SCRIPT)
        proc = subprocess.run([str(python), str(script), str(tasks), str(latency_calls), str(IN_FLIGHT)],
                              capture_output=True, text=True, timeout=600, cwd=folder)
    if proc.returncode != 0:
        raise RuntimeError(f"wove 2.0.3 benchmark failed:\n{proc.stderr}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out["throughput"], out["p50"], out["cpu"]


# -- main ---------------------------------------------------------------------
def best(results: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    return max(r[0] for r in results), min(r[1] for r in results), min(r[2] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=5000, help="no-op tasks for throughput")
    parser.add_argument("--latency-calls", type=int, default=500, help="sequential calls for p50")
    parser.add_argument("--cpu-jobs", type=int, default=8)
    parser.add_argument("--cpu-n", type=int, default=2_000_000, help="loop length of one CPU-bound job")
    parser.add_argument("--repeat", type=int, default=2, help="best of N (the machine may be shared)")
    parser.add_argument("--skip-wove2", action="store_true")
    args = parser.parse_args()

    rows: dict[str, tuple[float, float, float]] = {}
    for _ in range(args.repeat):
        for name, fn in (("ours (stdio, 1 process)", ours), ("raw pipe echo", raw_pipe),
                         ("ProcessPool(2)", process_pool)):
            result = asyncio.run(fn(args.tasks, args.latency_calls))
            rows[name] = best([rows[name], result]) if name in rows else result
        if not args.skip_wove2:
            result = wove2(args.tasks, args.latency_calls)
            name = "wove 2.0.3 (stdio)"
            rows[name] = best([rows[name], result]) if name in rows else result
    cpu_ours = min(asyncio.run(ours_cpu(args.cpu_jobs, args.cpu_n)) for _ in range(args.repeat))
    cpu_pool = min(asyncio.run(process_pool_cpu(args.cpu_jobs, args.cpu_n)) for _ in range(args.repeat))

    print(f"\nno-op tasks: {args.tasks} with {IN_FLIGHT} in flight; p50 over {args.latency_calls} "
          f"sequential calls; best of {args.repeat}\n")
    print(f"{'client':<26}{'tasks/s':>12}{'p50 (us)':>12}{'CPU us/task':>14}")
    for name, (throughput, p50, cpu) in rows.items():
        print(f"{name:<26}{throughput:>12,.0f}{p50:>12,.0f}{cpu:>14,.0f}")
    print("(CPU us/task: client + worker processes during the throughput run; steadier than")
    print(" tasks/s on a shared machine)")
    print(f"\nCPU-bound: {args.cpu_jobs} x burn({args.cpu_n:,}) on 2 processes")
    print(f"{'ours (stdio, processes=2)':<26}{cpu_ours:>11.2f}s")
    print(f"{'ProcessPool(2)':<26}{cpu_pool:>11.2f}s")

    ours_thr, ours_p50, ours_cpu_us = rows["ours (stdio, 1 process)"]
    pool_thr, pool_p50, _pool_cpu = rows["ProcessPool(2)"]
    print("\nratios (targets in brackets):")
    if "wove 2.0.3 (stdio)" in rows:
        w_thr, _w_p50, w_cpu = rows["wove 2.0.3 (stdio)"]
        print(f"  throughput ours / wove 2.0.3      {ours_thr / w_thr:6.2f}x  [>= 2.0]")
        print(f"  CPU per task wove 2.0.3 / ours    {w_cpu / ours_cpu_us:6.2f}x  (same target, by CPU)")
    print(f"  throughput ours / ProcessPool(2)  {ours_thr / pool_thr:6.2f}x")
    print(f"  throughput ours / raw pipe echo   {ours_thr / rows['raw pipe echo'][0]:6.2f}x")
    print(f"  p50 ours / ProcessPool(2)         {ours_p50 / pool_p50:6.2f}x  [<= 1.0]")
    print(f"  CPU wall ours / ProcessPool(2)    {cpu_ours / cpu_pool:6.2f}x  [<= 1.3]")


if __name__ == "__main__":
    main()
