"""gRPC throughput, side by side: wove 2.0.3's grpc executor, ours, and a raw grpc.aio echo.

All Wove clients talk to the same ``wove worker grpc`` subprocess (ours three times: one
``Session`` call, ``Send`` per run and ``Stream`` per run); the raw echo (the
limit: one unary call per task, no Wove codec, no worker engine) talks to an echo server
subprocess built the same way. No-op async tasks, 256 in flight.

    uv run --no-sync python bench/bench_grpc.py [--tasks 5000] [--rounds 3]
    uv run --no-sync python bench/bench_grpc.py --fallback   # 15 scenarios against a Send-only server
    uv run --no-sync python bench/bench_grpc.py --unary-variants  # client CPU per unary Send call

Targets: ours >= 1.5x wove 2.0.3, and within 2x of the raw echo.

``--unary-variants`` (issue 16): the client's own CPU (user + system, all threads) per unary
``Send`` call with 256 in flight against a Send-only server, for each way grpcio offers to
make the calls: ``grpc.aio`` (what the executor uses), ``grpc.aio`` with a minimal channel
(``grpc.minimal_stack``, no retries, no BDP probe, no channelz), 4 ``grpc.aio`` channels
round-robin (local subchannel pools), the sync API's ``.future()`` (C-core completion queue,
callbacks on grpc's thread, handed to the loop in batches, one ``call_soon_threadsafe`` per
batch) on 1 and 4 channels. Alternating rounds; medians and the ratio to ``grpc.aio``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _wove2 import wove2_python

IN_FLIGHT = 256

WOVE2_CLIENT = r'''
import asyncio, json, sys, time
from wove.environment import ExecutorRuntime

target, tasks, rounds, in_flight = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

async def noop():
    return None

async def main():
    runtime = ExecutorRuntime({"w": {"executor": "grpc", "executor_config": {"target": target}}}, {})
    await runtime.start()
    info = {"environment": "w", "delivery_max_in_flight": in_flight}
    rates = []
    try:
        for _ in range(rounds + 1):
            started = time.perf_counter()
            await asyncio.gather(*(runtime.run_task(task_name="noop", task_func=noop, task_args={}, task_info=info)
                                   for _ in range(tasks)))
            rates.append(tasks / (time.perf_counter() - started))
    finally:
        await runtime.stop()
    print(json.dumps(rates[1:]))  # the first round warms up

asyncio.run(main())
'''

ECHO_SERVER = r'''
import asyncio, grpc, grpc.aio

async def echo(request, context):
    return request

async def main():
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 256 << 20),
                                      ("grpc.max_send_message_length", 256 << 20)])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()

asyncio.run(main())
'''


#: A Wove 2.x-style server: a generic handler for Send only (no Session, no Stream),
#: decoding with wove's public codec and running on wove's WorkerEngine.
SEND_ONLY_SERVER = r'''
import asyncio, grpc, grpc.aio
from wove.protocol import decode_command, encode_event, TERMINAL_EVENTS
from wove.worker import WorkerEngine

engine = WorkerEngine(name="send-only")

async def send(request, context):
    frame = decode_command(request)
    if frame["type"] != "run_task":
        return b'{"events":[]}'
    encoded, done = [], asyncio.get_running_loop().create_future()
    def sink(event):
        if event["type"] != "heartbeat":
            encoded.append(encode_event(event))
        if event["type"] in TERMINAL_EVENTS and not done.done():
            done.set_result(None)
    await engine.submit(frame, sink)
    await done
    return b'{"events":[' + b",".join(encoded) + b"]}"

async def main():
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 256 << 20),
                                      ("grpc.max_send_message_length", 256 << 20)])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "wove.network_executor.WorkerService", {"Send": grpc.unary_unary_rpc_method_handler(send)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()

asyncio.run(main())
'''


async def noop() -> None:
    return None


async def fallback_scenarios(target: str) -> list[tuple[str, str]]:
    """15 fresh environments against a Send-only server: (scenario, outcome) for each."""
    from wove.runtime import ExecutorRuntime

    outcomes = []
    for n, (kind, size) in enumerate((kind, size) for size in (0, 100_000, 1_000_000)
                                     for kind in ("one", "sequential", "concurrent", "heartbeat", "mixed")):
        payload = b"p" * size
        definitions = {"w": {"executor": "grpc", "executor_config": {"target": target}}}
        count = {"one": 1, "sequential": 5, "concurrent": 50, "heartbeat": 20, "mixed": 30}[kind]
        try:
            async with ExecutorRuntime(definitions, {}) as runtime:
                def call(i: int, kind: str = kind, payload: bytes = payload) -> Any:
                    beat = kind == "heartbeat" or (kind == "mixed" and i % 2)
                    return runtime.call_with("w", len, (payload + b"x" * i,),
                                             **({"delivery_heartbeat_seconds": 5} if beat else {}))
                if kind == "sequential":
                    results = [await call(i) for i in range(count)]
                else:
                    results = list(await asyncio.gather(*(call(i) for i in range(count))))
            ok = results == [size + i for i in range(count)]
            outcomes.append((f"{n + 1:>2} {kind}/{size}", "ok" if ok else f"WRONG {results[:3]}"))
        except Exception as exc:
            outcomes.append((f"{n + 1:>2} {kind}/{size}", f"FAILED {exc}"))
    return outcomes


def fallback() -> int:
    server, target = start([sys.executable, "-c", SEND_ONLY_SERVER])
    try:
        outcomes = asyncio.run(fallback_scenarios(target))
    finally:
        server.terminate()
        server.wait(timeout=20)
    for name, outcome in outcomes:
        print(f"{name:<24} {outcome}")
    failed = sum(1 for _, outcome in outcomes if outcome != "ok")
    print(f"\n{len(outcomes) - failed} of {len(outcomes)} scenarios fell back to Send and succeeded")
    return 1 if failed else 0


def start(args: list[str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening on " not in line:
        proc.kill()
        raise RuntimeError(f"{args} did not start: {line!r}")
    return proc, line.split("listening on ", 1)[1].strip()


async def ours(target: str, tasks: int, rounds: int, streaming: Any = "auto") -> list[float]:
    """This executor: ``streaming`` "auto" (one Session call), False (Send per run), True (Stream per run)."""
    from wove.runtime import ExecutorRuntime

    definitions = {"w": {"executor": "grpc", "executor_config": {"target": target, "streaming": streaming}}}
    rates = []
    async with ExecutorRuntime(definitions, {"delivery_max_in_flight": IN_FLIGHT}) as runtime:
        for _ in range(rounds + 1):
            started = time.perf_counter()
            await asyncio.gather(*(runtime.call("w", noop) for _ in range(tasks)))
            rates.append(tasks / (time.perf_counter() - started))
    return rates[1:]


async def raw_echo(target: str, tasks: int, rounds: int) -> list[float]:
    import grpc.aio

    from wove.protocol import encode_frame

    body = encode_frame({"type": "run_task", "run_id": "noop:0", "task_id": "noop", "callable": noop,
                         "args": {}, "delivery": {"delivery_orphan_policy": "cancel"}})
    rates = []
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary("/bench.Echo/Echo")
        limit = asyncio.Semaphore(IN_FLIGHT)

        async def one() -> None:
            async with limit:
                await call(body)

        for _ in range(rounds + 1):
            started = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(tasks)))
            rates.append(tasks / (time.perf_counter() - started))
    return rates[1:]


def wove2(target: str, tasks: int, rounds: int) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "wove2_bench.py"
        script.write_text(WOVE2_CLIENT)
        result = subprocess.run([str(wove2_python()), str(script), target, str(tasks), str(rounds), str(IN_FLIGHT)],
                                capture_output=True, text=True, timeout=600, cwd=tmp)
    if result.returncode != 0:
        raise RuntimeError(f"wove 2.0.3 client failed:\n{result.stderr}")
    return [float(rate) for rate in json.loads(result.stdout.strip().splitlines()[-1])]


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _Batched:
    """Sync-API futures resolved on the loop: one call_soon_threadsafe per batch of completions."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.done: collections.deque[tuple[Any, asyncio.Future[Any]]] = collections.deque()
        self.lock = threading.Lock()
        self.scheduled = False

    def complete(self, call: Any, future: asyncio.Future[Any]) -> None:  # on grpc's thread
        with self.lock:
            self.done.append((call, future))
            if self.scheduled:
                return
            self.scheduled = True
        self.loop.call_soon_threadsafe(self.drain)

    def drain(self) -> None:
        with self.lock:
            items = list(self.done)
            self.done.clear()
            self.scheduled = False
        for call, future in items:
            if not future.done():
                error = call.exception()
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(call.result())


_MINIMAL = [("grpc.minimal_stack", 1), ("grpc.enable_retries", 0), ("grpc.http2.bdp_probe", 0),
            ("grpc.enable_channelz", 0)]
UNARY_VARIANTS = ("grpc.aio", "grpc.aio minimal", "grpc.aio x4", "sync future", "sync future x4")


async def unary_variant(target: str, variant: str, calls: int) -> float:
    """Client CPU µs per unary Send call of ``variant`` (256 in flight)."""
    import grpc
    import grpc.aio

    from wove.protocol import encode_frame

    method = "/wove.network_executor.WorkerService/Send"
    bodies = iter([encode_frame({"type": "run_task", "run_id": f"noop:{variant}:{i}", "task_id": "noop",
                                 "callable": noop, "args": {}, "delivery": {"delivery_orphan_policy": "cancel"}})
                   for i in range(calls + 300)])
    channels = 4 if variant.endswith("x4") else 1
    options = [("grpc.use_local_subchannel_pool", 1)] if channels > 1 else []
    if variant.endswith("minimal"):
        options += _MINIMAL
    turn = itertools.count()
    loop = asyncio.get_running_loop()
    closers: list[Any] = []
    call_one: Any
    if variant.startswith("grpc.aio"):
        aio = [grpc.aio.insecure_channel(target, options=options) for _ in range(channels)]
        closers = [channel.close for channel in aio]
        stubs = [channel.unary_unary(method) for channel in aio]

        def call_one() -> Any:
            return stubs[next(turn) % channels](next(bodies))
    else:
        sync = [grpc.insecure_channel(target, options=options) for _ in range(channels)]
        closers = [channel.close for channel in sync]
        stubs = [channel.unary_unary(method) for channel in sync]
        batched = _Batched(loop)

        def call_one() -> Any:
            future = loop.create_future()
            stubs[next(turn) % channels].future(next(bodies)).add_done_callback(
                lambda call: batched.complete(call, future))
            return future
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one() -> None:
        async with gate:
            await call_one()

    try:
        await asyncio.gather(*(one() for _ in range(300)))  # warm: connection, first calls
        before = _cpu()
        await asyncio.gather(*(one() for _ in range(calls)))
        return (_cpu() - before) / calls * 1e6
    finally:
        for close in closers:
            result = close()
            if asyncio.iscoroutine(result):
                await result


def unary_variants(calls: int, rounds: int) -> int:
    server, target = start([sys.executable, "-c", SEND_ONLY_SERVER])
    figures: dict[str, list[float]] = {name: [] for name in UNARY_VARIANTS}
    try:
        for _ in range(rounds):
            for name in UNARY_VARIANTS:
                figures[name].append(asyncio.run(unary_variant(target, name, calls)))
    finally:
        server.terminate()
        server.wait(timeout=20)
    base = statistics.median(figures["grpc.aio"])
    print(f"\nclient CPU per unary Send call, {IN_FLIGHT} in flight, {calls} calls x {rounds} rounds")
    for name, values in figures.items():
        print(f"{name:<18} {statistics.median(values):7.0f} µs  {statistics.median(values) / base:5.2f}x  "
              f"({', '.join(f'{v:.0f}' for v in values)})")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fallback", action="store_true",
                        help="instead: 15 scenarios against a Send-only (Wove 2.x-style) server")
    parser.add_argument("--unary-variants", action="store_true",
                        help="instead: client CPU per unary Send call for each way grpcio makes the calls")
    args = parser.parse_args()
    if args.fallback:
        return fallback()
    if args.unary_variants:
        return unary_variants(args.tasks, args.rounds)
    worker, target = start([sys.executable, "-m", "wove.cli", "worker", "grpc", "--port", "0",
                            "--max-concurrency", str(IN_FLIGHT)])
    echo, echo_target = start([sys.executable, "-c", ECHO_SERVER])
    try:
        rows = {
            "wove 2.0.3 grpc": wove2(target, args.tasks, args.rounds),
            "ours (grpc)": asyncio.run(ours(target, args.tasks, args.rounds)),
            "ours, Send per run": asyncio.run(ours(target, args.tasks, args.rounds, streaming=False)),
            "ours, Stream per run": asyncio.run(ours(target, args.tasks, args.rounds, streaming=True)),
            "raw grpc.aio echo": asyncio.run(raw_echo(echo_target, args.tasks, args.rounds)),
        }
    finally:
        for proc in (worker, echo):
            proc.terminate()
            proc.wait(timeout=20)
    best = {name: max(rates) for name, rates in rows.items()}
    print(f"\n{args.tasks} no-op tasks x {args.rounds} rounds, {IN_FLIGHT} in flight, cpus={os.cpu_count()}")
    print(f"{'client':<22} {'best tasks/s':>13} {'rounds':>30}")
    for name, rates in rows.items():
        print(f"{name:<22} {best[name]:>13,.0f} {', '.join(f'{r:,.0f}' for r in rates):>30}")
    vs_v2 = best["ours (grpc)"] / best["wove 2.0.3 grpc"]
    vs_raw = best["raw grpc.aio echo"] / best["ours (grpc)"]
    print(f"\nours / wove 2.0.3 = {vs_v2:.2f}x (target >= 1.5x)  {'OK' if vs_v2 >= 1.5 else 'MISSED'}")
    print(f"raw echo / ours   = {vs_raw:.2f}x (target <= 2x)    {'OK' if vs_raw <= 2 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
