"""runtime.map vs asyncio.gather over runtime.call: throughput and peak memory, in one run.

    uv run python bench/bench_map.py [items]        # default 100,000

Each scenario runs in its own process, so its peak RSS (``ru_maxrss``) is its own: the
figure reported is the growth over the process's RSS once the runtime had started. ``map``
keeps at most ``buffersize`` (256) results outstanding, whatever the input's length;
``gather`` holds a coroutine, a task and a result per item. Ratios are taken within the
same run, so the machine's speed cancels out.
"""

from __future__ import annotations

import asyncio
import json
import resource
import subprocess
import sys
import time

SCENARIOS = [("local", "map"), ("local", "gather"), ("stdio", "map"), ("stdio", "gather")]


async def square_async(x: int) -> int:
    return x * x


def square(x: int) -> int:
    return x * x


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


async def scenario(executor: str, how: str, items: int) -> dict[str, float]:
    from wove.environment import ExecutorRuntime

    func = square_async if executor == "local" else square
    async with ExecutorRuntime({"env": {"executor": executor}}, {}) as runtime:
        assert [x async for x in runtime.map("env", func, range(1000))] == [i * i for i in range(1000)]  # warm up
        baseline = rss_mb()
        started = time.perf_counter()
        total = 0
        if how == "map":
            async for value in runtime.map("env", func, range(items)):
                total += value
        else:
            for value in await asyncio.gather(*(runtime.call("env", func, i) for i in range(items))):
                total += value
        elapsed = time.perf_counter() - started
    assert total == sum(i * i for i in range(items)), "wrong results"
    return {"items_per_s": items / elapsed, "seconds": elapsed, "rss_start_mb": baseline,
            "rss_growth_mb": rss_mb() - baseline}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--scenario":
        _, _, executor, how, items = sys.argv
        print(json.dumps(asyncio.run(scenario(executor, how, int(items)))))
        return
    items = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    results: dict[tuple[str, str], dict[str, float]] = {}
    for executor, how in SCENARIOS:
        out = subprocess.run([sys.executable, __file__, "--scenario", executor, how, str(items)],
                             capture_output=True, text=True, timeout=900)
        if out.returncode != 0:
            raise RuntimeError(f"{executor}/{how} failed: {out.stderr[-2000:]}")
        results[(executor, how)] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{items:,} items, one process per scenario")
    print(f"{'':16} {'items/s':>10} {'seconds':>8} {'RSS at start':>13} {'peak RSS growth':>16}")
    for (executor, how), r in results.items():
        print(f"{executor + ' ' + how:16} {r['items_per_s']:>10,.0f} {r['seconds']:>8.2f} "
              f"{r['rss_start_mb']:>10.1f} MB {r['rss_growth_mb']:>13.1f} MB")
    print()
    for executor in ("local", "stdio"):
        m, g = results[(executor, "map")], results[(executor, "gather")]
        print(f"{executor}: map throughput {m['items_per_s'] / g['items_per_s']:.2f}x gather over call; "
              f"peak memory growth {m['rss_growth_mb']:.1f} MB (map) vs {g['rss_growth_mb']:.1f} MB (gather)")


if __name__ == "__main__":
    main()
