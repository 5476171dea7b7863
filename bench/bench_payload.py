"""Large payloads: binary frames against JSON frames, side by side in one run.

For each transport (stdio, http, grpc, websocket), our client against our own worker:

* ``1 MiB echo``: sequential calls of a task that returns its 1 MiB ``bytes`` argument,
  in MiB/s, with ``binary_frames`` on (the default: pickles as raw bytes, protocol-5
  out-of-band buffers) and off (base64 in JSON, what a Wove 2.x peer gets), and
  ``concurrent.futures.ProcessPoolExecutor(2)`` doing the same echo (``run_in_executor``);
* ``100 MiB``: one call with a 100 MiB argument that comes back as a 100 MiB result, in a
  fresh client process, reporting the peak RSS of the client and of the worker process
  (``ru_maxrss`` / ``VmHWM``) above what each held before the call, as a multiple of the
  payload (the goal: at most 3x on each side).

Run: ``uv run --no-sync python bench/bench_payload.py`` (``--calls N``, ``--repeat N``,
``--big-mib N``, ``--transports stdio,http``, ``--skip-big``). Figures go to
docs/performance.md as ratios of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from wove.environment import ExecutorRuntime
from wove.testing import WorkerProcess, tasks

MIB = 1 << 20
TRANSPORTS = ("stdio", "http", "grpc", "websocket")


def echo_sync(data: bytes) -> bytes:
    return data


@contextmanager
def environment(transport: str, binary: bool) -> Iterator[dict[str, Any]]:
    """The environment definition of ``transport`` (and its worker service, started here)."""
    options: dict[str, Any] = {"binary_frames": binary}
    if transport == "stdio":
        yield {"executor": "stdio", "executor_config": options}
        return
    with WorkerProcess(transport) as worker:
        key = "target" if transport == "grpc" else "url"
        yield {"executor": transport, "executor_config": {key: worker.address, **options}}


async def echo_rate(definition: dict[str, Any], calls: int, size: int) -> float:
    data = os.urandom(size)
    async with ExecutorRuntime({"e": definition}) as runtime:
        assert await runtime.call("e", tasks.echo, data) == data  # warm: connection, callable cache
        start = time.perf_counter()
        for _ in range(calls):
            if await runtime.call("e", tasks.echo, data) != data:
                raise AssertionError("echo returned other bytes")
        return calls * size / MIB / (time.perf_counter() - start)


async def pool_rate(calls: int, size: int) -> float:
    data = os.urandom(size)
    loop = asyncio.get_running_loop()
    with concurrent.futures.ProcessPoolExecutor(2) as pool:
        assert await loop.run_in_executor(pool, echo_sync, data) == data
        start = time.perf_counter()
        for _ in range(calls):
            if await loop.run_in_executor(pool, echo_sync, data) != data:
                raise AssertionError("echo returned other bytes")
        return calls * size / MIB / (time.perf_counter() - start)


def high_water_mib(pid: int) -> float:
    """Peak resident memory of process ``pid`` (Linux ``VmHWM``), in MiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def resident_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def big_call(definition: dict[str, Any], size: int) -> dict[str, float]:
    """In this (fresh) process: one ``size``-byte echo; peak RSS of both sides above
    their level before the call, in MiB."""
    async with ExecutorRuntime({"e": definition}) as runtime:
        worker = await runtime.call("e", tasks.pid)
        await runtime.call("e", tasks.echo, b"warm")
        client_before = resident_mib(os.getpid())
        worker_before = resident_mib(worker)
        data = os.urandom(size)
        start = time.perf_counter()
        result = await runtime.call("e", tasks.echo, data)
        seconds = time.perf_counter() - start
        if result != data:
            raise AssertionError("the 100 MiB echo came back different")
        del result
        worker_peak = high_water_mib(worker)
    client_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "client_peak_mib": client_peak - client_before,
            "worker_peak_mib": worker_peak - worker_before}


def big_in_subprocess(transport: str, size: int) -> dict[str, Any]:
    command = [sys.executable, __file__, "--one-big", transport, "--big-mib", str(size // MIB)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--big-mib", type=int, default=100)
    parser.add_argument("--transports", default=",".join(TRANSPORTS))
    parser.add_argument("--skip-big", action="store_true")
    parser.add_argument("--one-big", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_big:
        with environment(args.one_big, True) as definition:
            print(json.dumps(asyncio.run(big_call(definition, args.big_mib * MIB))))
        return 0
    transports = args.transports.split(",")
    rates: dict[str, list[float]] = {}
    for _ in range(args.repeat):  # interleaved, so drift hits every row alike
        rates.setdefault("ProcessPoolExecutor(2)", []).append(asyncio.run(pool_rate(args.calls, MIB)))
        for transport in transports:
            for binary in (True, False):
                with environment(transport, binary) as definition:
                    row = f"{transport} ({'binary' if binary else 'JSON'} frames)"
                    rates.setdefault(row, []).append(asyncio.run(echo_rate(definition, args.calls, MIB)))
    pool = statistics.median(rates["ProcessPoolExecutor(2)"])
    print(f"1 MiB echo, sequential calls, median of {args.repeat} (MiB/s; ratio to ProcessPoolExecutor(2))")
    for row, values in rates.items():
        value = statistics.median(values)
        print(f"  {row:32s} {value:9.1f}   {value / pool:5.2f}x")
    for transport in transports:
        json_rate = statistics.median(rates[f"{transport} (JSON frames)"])
        binary_rate = statistics.median(rates[f"{transport} (binary frames)"])
        print(f"  {transport}: binary / JSON frames {binary_rate / json_rate:.2f}x")
    if not args.skip_big:
        print(f"\n{args.big_mib} MiB argument echoed back as a {args.big_mib} MiB result (binary frames; peak RSS "
              "above the level before the call, as a multiple of the payload)")
        for transport in transports:
            figures = big_in_subprocess(transport, args.big_mib * MIB)
            if "error" in figures:
                print(f"  {transport:10s} FAILED: {figures['error']}")
                continue
            print(f"  {transport:10s} {figures['seconds']:6.2f} s   client {figures['client_peak_mib']:7.1f} MiB "
                  f"({figures['client_peak_mib'] / args.big_mib:.2f}x)   worker {figures['worker_peak_mib']:7.1f} MiB "
                  f"({figures['worker_peak_mib'] / args.big_mib:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
