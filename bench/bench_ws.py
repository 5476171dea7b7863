"""WebSocket executor throughput, side by side in one run.

Rows (no-op tasks, 256 in flight, one connection each):

* wove 2.0.3's websocket executor (in its own venv, see ``_wove2.py``) against our
  ``wove worker websocket``;
* ours (``wove_executor_ws``) against the same worker;
* a raw websockets echo over one connection (no Wove at all): the limit of the
  library and loop on this machine, with messages the size of a no-op command.

Run: ``uv run --no-sync python bench/bench_ws.py [--tasks 20000] [--repeat 3]``.
Targets: ours >= 1.5x wove 2.0.3, and within 2x of the raw echo.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
IN_FLIGHT = 256

WOVE2_SCRIPT = r'''
import asyncio, json, sys, time
from wove.environment import ExecutorRuntime

url, tasks, in_flight, repeat = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

async def noop():
    return None

async def main():
    runtime = ExecutorRuntime({"ws": {"executor": "websocket", "executor_config": {"url": url}}}, {})
    await runtime.start()
    info = {"environment": "ws"}

    async def lane(count):
        for _ in range(count):
            await runtime.run_task(task_name="noop", task_func=noop, task_args={}, task_info=info)

    async def run(count):
        await asyncio.gather(*(lane(count // in_flight) for _ in range(in_flight)))

    rates, cpu = [], []
    try:
        await run(min(tasks, 2560))  # warm-up
        for _ in range(repeat):
            started, cpu0 = time.perf_counter(), time.process_time()
            await run(tasks)
            rates.append(tasks / (time.perf_counter() - started))
            cpu.append((time.process_time() - cpu0) / tasks * 1e6)
    finally:
        await runtime.stop()
    print(json.dumps([rates, cpu]))

asyncio.run(main())
'''

ECHO_SERVER = r'''
import asyncio, sys
from websockets.asyncio.server import serve

async def echo(ws):
    async for message in ws:
        await ws.send(message)

async def main():
    async with serve(echo, "127.0.0.1", 0, compression=None, max_size=None, max_queue=256) as server:
        print("listening on ws://127.0.0.1:%d/" % server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Future()

asyncio.run(main())
'''


def cpu_seconds(pid: int) -> float:
    """User+system CPU of a process (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(command: list[str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise RuntimeError(f"{command} did not start: {line!r}")
    return proc, line.split("listening on", 1)[1].strip()


async def _noop() -> None:
    return None


async def bench_ours(url: str, tasks: int, repeat: int) -> tuple[list[float], list[float]]:
    """Rates (tasks/s) and client CPU (µs per task) of each repetition."""
    from wove.runtime import ExecutorRuntime

    rates, cpu = [], []
    async with ExecutorRuntime({"ws": {"executor": "websocket", "executor_config": {"url": url}}}, {}) as runtime:
        async def lane(count: int) -> None:
            for _ in range(count):
                await runtime.call("ws", _noop)

        async def run(count: int) -> None:
            await asyncio.gather(*(lane(count // IN_FLIGHT) for _ in range(IN_FLIGHT)))

        await run(min(tasks, 2560))  # warm-up
        for _ in range(repeat):
            started, cpu0 = time.perf_counter(), time.process_time()
            await run(tasks)
            rates.append(tasks / (time.perf_counter() - started))
            cpu.append((time.process_time() - cpu0) / tasks * 1e6)
    return rates, cpu


async def bench_echo(url: str, messages: int, repeat: int, size: int) -> tuple[list[float], list[float]]:
    from websockets.asyncio.client import connect

    payload = ("x" * size).encode()
    rates, cpu = [], []
    async with connect(url, compression=None, max_size=None, max_queue=256, proxy=None) as ws:
        async def run(count: int) -> None:
            window = asyncio.Semaphore(IN_FLIGHT)

            async def receiver() -> None:
                for _ in range(count):
                    await ws.recv(decode=False)
                    window.release()

            reading = asyncio.ensure_future(receiver())
            for _ in range(count):
                await window.acquire()
                await ws.send(payload, text=True)
            await reading

        await run(min(messages, 2000))
        for _ in range(repeat):
            started, cpu0 = time.perf_counter(), time.process_time()
            await run(messages)
            rates.append(messages / (time.perf_counter() - started))
            cpu.append((time.process_time() - cpu0) / messages * 1e6)
    return rates, cpu


def noop_command_size() -> int:
    from wove.protocol import encode_frame

    return len(encode_frame({"type": "run_task", "run_id": "noop:" + "0" * 32, "task_id": "noop", "callable": _noop,
                             "args": {}, "delivery": {"delivery_cancel_mode": "best_effort",
                                                      "delivery_orphan_policy": "cancel"}}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-wove2", action="store_true")
    args = parser.parse_args()

    worker, url = start([sys.executable, "-m", "wove.cli", "worker", "websocket", "--port", "0"])
    echo, echo_url = start([sys.executable, "-c", ECHO_SERVER])
    results: dict[str, tuple[list[float], list[float]]] = {}
    server_cpu: dict[str, float] = {}
    warm = min(args.tasks, 2560)
    try:
        if not args.skip_wove2:
            sys.path.insert(0, str(HERE))
            from _wove2 import wove2_python

            before = cpu_seconds(worker.pid)
            with tempfile.TemporaryDirectory() as tmp:
                script = Path(tmp) / "wove2_bench.py"
                script.write_text(WOVE2_SCRIPT)
                out = subprocess.run(
                    [str(wove2_python()), str(script), url, str(args.tasks), str(IN_FLIGHT), str(args.repeat)],
                    capture_output=True, text=True, timeout=900, env=os.environ.copy(),
                )
            if out.returncode != 0:
                print(out.stderr[-2000:], file=sys.stderr)
            else:
                rates, cpu = json.loads(out.stdout.strip().splitlines()[-1])
                results["wove 2.0.3 websocket executor"] = (rates, cpu)
                server_cpu["wove 2.0.3 websocket executor"] = (cpu_seconds(worker.pid) - before) / (
                    warm + args.tasks * args.repeat) * 1e6
        before = cpu_seconds(worker.pid)
        results["wove-executor-ws (ours)"] = asyncio.run(bench_ours(url, args.tasks, args.repeat))
        server_cpu["wove-executor-ws (ours)"] = (cpu_seconds(worker.pid) - before) / (
            warm + args.tasks * args.repeat) * 1e6
        size = noop_command_size()
        before = cpu_seconds(echo.pid)
        name = f"raw websockets echo ({size} B msgs)"
        results[name] = asyncio.run(bench_echo(echo_url, args.tasks, args.repeat, size))
        server_cpu[name] = (cpu_seconds(echo.pid) - before) / (min(args.tasks, 2000) + args.tasks * args.repeat) * 1e6
    finally:
        for proc in (worker, echo):
            proc.terminate()
            proc.wait(timeout=10)

    best = {name: max(rates) for name, (rates, _cpu) in results.items()}
    width = max(len(name) for name in best)
    print(f"\n{args.tasks} no-op tasks, {IN_FLIGHT} in flight, one connection, best of {args.repeat}\n")
    print(f"{'':{width}}  {'per second':>12}  {'client CPU/task':>15}  {'server CPU/task':>15}  runs")
    for name, (rates, cpu) in results.items():
        print(f"{name:{width}}  {best[name]:>12,.0f}  {min(cpu):>12,.0f} µs  {server_cpu.get(name, 0):>12,.0f} µs  "
              f"{', '.join(f'{r:,.0f}' for r in rates)}")
    ours = best.get("wove-executor-ws (ours)")
    wove2 = best.get("wove 2.0.3 websocket executor")
    raw = next((v for k, v in best.items() if k.startswith("raw")), None)
    print()
    if ours and wove2:
        print(f"ours / wove 2.0.3 : {ours / wove2:.2f}x  (target >= 1.5x)")
    if ours and raw:
        print(f"raw echo / ours   : {raw / ours:.2f}x  (target <= 2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
