"""Local-executor scenario, run unchanged by our wove and by wove==2.0.3 (same seed API).

Prints one JSON object: throughput (tasks/s, 256 in flight), sequential latency p50/p99 (µs)
and the wall time of 32 concurrent ``time.sleep(0.2)`` sync tasks.
"""

import asyncio
import json
import statistics
import sys
import time

from wove.environment import ExecutorRuntime, LocalEnvironmentExecutor

IN_FLIGHT = 256


async def noop():
    return None


def blocking():
    time.sleep(0.2)


async def drive(submit, count):
    """Keep IN_FLIGHT calls outstanding: IN_FLIGHT loops each awaiting one call at a time."""
    remaining = [count]

    async def loop():
        while remaining[0] > 0:
            remaining[0] -= 1
            await submit(remaining[0])

    started = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(IN_FLIGHT)))
    return count / (time.perf_counter() - started)


class FramedLocal(LocalEnvironmentExecutor):
    """A subclass: our runtime sends it frames instead of awaiting calls inline."""


async def main(count, framed=False):
    executor = FramedLocal() if framed else "local"
    runtime = ExecutorRuntime({"local": {"executor": executor}}, {})
    await runtime.start()
    info = {"environment": "local"}

    async def submit(i):
        await runtime.run_task(task_name="noop", task_func=noop, task_args={}, task_info=info)

    await drive(submit, 2000)  # warm up
    throughput = max([await drive(submit, count) for _ in range(3)])
    latencies = []
    for i in range(3000):
        started = time.perf_counter()
        await submit(i)
        latencies.append(time.perf_counter() - started)
    latencies.sort()
    started = time.perf_counter()
    await asyncio.gather(*(
        runtime.run_task(task_name="sleep", task_func=blocking, task_args={}, task_info=info) for _ in range(32)
    ))
    sleep_wall = time.perf_counter() - started
    await runtime.stop()
    print(json.dumps({
        "throughput": throughput,
        "p50_us": statistics.median(latencies) * 1e6,
        "p99_us": latencies[int(len(latencies) * 0.99)] * 1e6,
        "sleep32_s": sleep_wall,
    }))


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 20000, framed="--framed" in sys.argv))
