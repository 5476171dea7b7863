"""Local executor: ours vs wove==2.0.3 vs bare asyncio, in one run.

    uv run python bench/bench_local.py [tasks]

Each figure is reported with its ratio to the baselines measured in the same run, never
as an absolute target: the machine's speed cancels out.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _wove2 import wove2_python  # noqa: E402

IN_FLIGHT = 256


async def _noop() -> None:
    return None


async def asyncio_baseline(count: int) -> dict[str, float]:
    """Bare ``asyncio.create_task`` per no-op, 256 in flight: the ceiling."""
    remaining = [0]

    async def loop() -> None:
        while remaining[0] > 0:
            remaining[0] -= 1
            await asyncio.create_task(_noop())

    best = 0.0
    for _ in range(3):
        remaining[0] = count
        started = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(IN_FLIGHT)))
        best = max(best, count / (time.perf_counter() - started))
    latencies = []
    for _ in range(3000):
        started = time.perf_counter()
        await asyncio.create_task(_noop())
        latencies.append(time.perf_counter() - started)
    return {"throughput": best, "p50_us": statistics.median(latencies) * 1e6}


def scenario(python: str, count: int, *extra: str) -> dict[str, float]:
    out = subprocess.run([python, str(HERE / "_scenario_local.py"), str(count), *extra],
                         capture_output=True, text=True, timeout=600, cwd=HERE)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    reference_python = str(wove2_python())
    ours_runs, reference_runs = [], []
    for _ in range(2):  # alternate, so background load hits both sides alike; keep the best
        ours_runs.append(scenario(sys.executable, count))
        reference_runs.append(scenario(reference_python, count))
    ours = max(ours_runs, key=lambda r: r["throughput"])
    framed = scenario(sys.executable, count, "--framed")
    reference = max(reference_runs, key=lambda r: r["throughput"])
    bare = asyncio.run(asyncio_baseline(count))
    rows = [
        ("wove-core local", ours),
        ("  (frame path)", framed),
        ("wove 2.0.3 local", reference),
        ("bare asyncio", bare),
    ]
    print(f"{'':18} {'tasks/s':>10} {'p50 µs':>8} {'p99 µs':>8} {'32 x sleep(0.2)':>14}")
    for name, r in rows:
        sleep = f"{r['sleep32_s']:.2f} s" if "sleep32_s" in r else "-"
        p99 = f"{r['p99_us']:.0f}" if "p99_us" in r else "-"
        print(f"{name:18} {r['throughput']:>10,.0f} {r['p50_us']:>8.0f} {p99:>8} {sleep:>14}")
    print()
    print(f"throughput vs wove 2.0.3: {ours['throughput'] / reference['throughput']:.2f}x (target >= 2x)")
    print(f"throughput vs bare asyncio: {ours['throughput'] / bare['throughput']:.2f}x")
    print(f"frame path (executor subclasses, sync callables, idempotency keys) vs wove 2.0.3: "
          f"{framed['throughput'] / reference['throughput']:.2f}x")
    print(f"p50 latency vs wove 2.0.3: {ours['p50_us'] / reference['p50_us']:.2f}x (lower is better)")
    print(f"32 concurrent time.sleep(0.2): ours {ours['sleep32_s']:.2f} s (target < 0.5 s), "
          f"wove 2.0.3 {reference['sleep32_s']:.2f} s")


if __name__ == "__main__":
    main()
