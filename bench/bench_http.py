"""HTTP executor benchmark: one ``wove worker http`` service, several clients.

Clients, all against the same worker service (started once):

* ``wove 2.0.3``  — the reference http executor (urllib in threads), in its own venv;
* ``ours``        — ``ExecutorRuntime`` + our ``http`` executor (default transport aiohttp),
  and ``ours/httpx`` with ``transport="httpx"`` (httpx's own pool, tuned limits);
* ``naive httpx`` — one default ``httpx.AsyncClient`` POSTing encoded frames;
* ``raw asyncio`` — a minimal HTTP/1.1 keep-alive client on asyncio streams (the limit).

Workloads: no-op tasks with 256 in flight (tasks/s), and 64 concurrent
``await asyncio.sleep(0.5)`` (wall time). Run: ``uv run --no-sync python bench/bench_http.py``
(``--tasks N`` to change the no-op count, ``--skip-wove2`` without the reference venv).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

IN_FLIGHT = 256


async def noop() -> None:
    return None


async def nap(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "slept"


def start_worker() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "wove.cli", "worker", "http", "--port", "0", "--max-concurrency", "1024"],
        stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening on " not in line:
        proc.kill()
        raise RuntimeError(f"worker did not start: {line!r}")
    return proc, line.split("listening on ", 1)[1].strip()


# -- ours ---------------------------------------------------------------------
async def ours(url: str, tasks: int, transport: str) -> tuple[float, float]:
    from wove.runtime import ExecutorRuntime

    definition = {"executor": "http", "executor_config": {"url": url, "transport": transport},
                  "delivery_max_in_flight": IN_FLIGHT}
    async with ExecutorRuntime({"w": definition}, {}) as runtime:
        await asyncio.gather(*(runtime.call("w", noop) for _ in range(IN_FLIGHT)))  # warm-up
        async def lane(count: int) -> None:  # IN_FLIGHT lanes, each one call at a time
            for _ in range(count):
                await runtime.call("w", noop)

        started = time.perf_counter()
        await asyncio.gather(*(lane(tasks // IN_FLIGHT + (i < tasks % IN_FLIGHT)) for i in range(IN_FLIGHT)))
        rate = tasks / (time.perf_counter() - started)
        started = time.perf_counter()
        results = await asyncio.gather(*(runtime.call("w", nap, 0.5) for _ in range(64)))
        sleep_wall = time.perf_counter() - started
        assert results == ["slept"] * 64
    return rate, sleep_wall


# -- naive httpx ----------------------------------------------------------------
def _frame(i: int) -> dict[str, Any]:
    return {"type": "run_task", "run_id": f"noop:{i}-{time.monotonic_ns()}", "task_id": "noop",
            "callable": noop, "args": {}, "delivery": {}}


async def naive_httpx(url: str, tasks: int) -> float:
    import httpx

    from wove.protocol import decode_events, encode_frame

    limit = asyncio.Semaphore(IN_FLIGHT)
    async with httpx.AsyncClient(timeout=None) as client:
        async def one(i: int) -> None:
            async with limit:
                response = await client.post(url, content=encode_frame(_frame(i)),
                                             headers={"content-type": "application/json"})
                assert decode_events(response.content)[-1]["type"] == "task_result"

        await asyncio.gather(*(one(i) for i in range(IN_FLIGHT)))
        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(tasks)))
        return tasks / (time.perf_counter() - started)


async def httpx_pools(url: str, tasks: int, pools: int) -> float:
    """Several tuned httpx.AsyncClients (native pool), requests spread round-robin."""
    import httpx

    from wove.protocol import decode_events, encode_frame

    size = IN_FLIGHT // pools
    clients = [httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=size, max_keepalive_connections=size))
               for _ in range(pools)]
    limit = asyncio.Semaphore(IN_FLIGHT)

    async def one(i: int) -> None:
        async with limit:
            response = await clients[i % pools].post(url, content=encode_frame(_frame(i)),
                                                     headers={"content-type": "application/json"})
            assert decode_events(response.content)[-1]["type"] == "task_result"

    try:
        await asyncio.gather(*(one(i) for i in range(IN_FLIGHT)))
        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(tasks)))
        return tasks / (time.perf_counter() - started)
    finally:
        for client in clients:
            await client.aclose()


# -- raw asyncio HTTP/1.1 keep-alive ----------------------------------------------
async def raw_asyncio(url: str, tasks: int) -> float:
    import urllib.parse

    from wove.protocol import encode_frame

    parts = urllib.parse.urlsplit(url)
    body_template = encode_frame(_frame(0))
    remaining = [tasks]

    async def connection() -> int:
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        done = 0
        try:
            while remaining[0] > 0:
                remaining[0] -= 1
                body = body_template.replace(b'"noop:0-', f'"noop:{remaining[0]}-'.encode(), 1)
                writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (parts.path.encode(), parts.netloc.encode(),
                                                                  len(body), body))
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                payload = await reader.readexactly(length)
                assert b"task_result" in payload
                done += 1
        finally:
            writer.close()
        return done

    remaining[0] = IN_FLIGHT
    await asyncio.gather(*(connection() for _ in range(IN_FLIGHT)))
    remaining[0] = tasks
    started = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(IN_FLIGHT)))
    return tasks / (time.perf_counter() - started)


# -- wove 2.0.3 ---------------------------------------------------------------------
WOVE2_SCRIPT = textwrap.dedent('''
    import asyncio, json, sys, time, uuid
    from wove.environment import HttpEnvironmentExecutor

    url, tasks = sys.argv[1], int(sys.argv[2])

    async def noop():
        return None

    async def nap(seconds):
        await asyncio.sleep(seconds)
        return "slept"

    async def batch(executor, fn, args, count, limit):
        waiting = {}
        async def receiver():
            while waiting:
                event = await executor.recv()
                if event["type"] in ("task_result", "task_error", "task_cancelled"):
                    fut = waiting.pop(event["run_id"], None)
                    if fut: fut.set_result(event)
        async def one():
            run_id = "t:" + uuid.uuid4().hex
            fut = asyncio.get_running_loop().create_future()
            waiting[run_id] = fut
            await executor.send({"type": "run_task", "run_id": run_id, "task_id": "t", "callable": fn,
                                 "args": args, "delivery": {}})
            event = await fut
            assert event["type"] == "task_result", event
            return event["result"]
        async def lane(n):  # `limit` lanes, each one call at a time: `limit` in flight
            return [await one() for _ in range(n)]
        lanes = [asyncio.ensure_future(lane(count // limit + (i < count % limit))) for i in range(min(limit, count))]
        await asyncio.sleep(0)
        recv = asyncio.ensure_future(receiver())
        results = [r for chunk in await asyncio.gather(*lanes) for r in chunk]
        recv.cancel()
        return results

    async def main():
        executor = HttpEnvironmentExecutor()
        await executor.start(environment_name="bench", environment_config={"url": url}, run_config={})
        await batch(executor, noop, {}, 256, 256)
        started = time.perf_counter()
        await batch(executor, noop, {}, tasks, 256)
        rate = tasks / (time.perf_counter() - started)
        started = time.perf_counter()
        results = await batch(executor, nap, {"seconds": 0.5}, 64, 64)
        wall = time.perf_counter() - started
        assert results == ["slept"] * 64
        await executor.stop()
        print(json.dumps({"rate": rate, "sleep": wall}))

    asyncio.run(main())
''')


def wove2(url: str, tasks: int) -> tuple[float, float]:
    from _wove2 import wove2_python

    python = wove2_python()
    out = subprocess.run([str(python), "-c", WOVE2_SCRIPT, url, str(tasks)], capture_output=True, text=True,
                         timeout=600, check=False)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return data["rate"], data["sleep"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--skip-wove2", action="store_true")
    args = parser.parse_args()
    proc, url = start_worker()
    rows: dict[str, tuple[float, float | None]] = {}
    try:
        if not args.skip_wove2:
            rows["wove 2.0.3 http"] = wove2(url, min(args.tasks, 3000))
        rows["ours (aiohttp transport)"] = asyncio.run(ours(url, args.tasks, "aiohttp"))
        slow = min(args.tasks, 1000)  # httpx's own pool is slow at this concurrency
        rows["ours (httpx transport)"] = asyncio.run(ours(url, slow, "httpx"))
        rows["naive httpx.AsyncClient"] = (asyncio.run(naive_httpx(url, slow)), None)
        rows["16 tuned httpx clients"] = (asyncio.run(httpx_pools(url, slow, 16)), None)
        rows["raw asyncio HTTP/1.1"] = (asyncio.run(raw_asyncio(url, args.tasks)), None)
    finally:
        proc.terminate()
        proc.wait(10)
    print(f"\nworker: {url}; no-op tasks with {IN_FLIGHT} in flight; 64 x sleep(0.5)\n")
    print(f"{'client':28} {'tasks/s':>10} {'64 x sleep(0.5)':>16}")
    for name, (rate, wall) in rows.items():
        print(f"{name:28} {rate:10,.0f} {(f'{wall:.3f} s' if wall is not None else '-'):>16}")
    ours_rate = rows["ours (aiohttp transport)"][0]
    raw = rows["raw asyncio HTTP/1.1"][0]
    print()
    if "wove 2.0.3 http" in rows:
        print(f"ours / wove 2.0.3      = {ours_rate / rows['wove 2.0.3 http'][0]:.2f}x  (target >= 2x)")
    print(f"raw asyncio / ours     = {raw / ours_rate:.2f}x  (target <= 3x)")
    print(f"ours / naive httpx     = {ours_rate / rows['naive httpx.AsyncClient'][0]:.2f}x")


if __name__ == "__main__":
    main()
