"""One measurement of bench_observer.py, in its own process (the build under test is first on
PYTHONPATH): ``_scenario_observer.py WORKLOAD COUNT OBSERVER``; prints one JSON object."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import wove
from wove.environment import ExecutorRuntime, LocalEnvironmentExecutor

IN_FLIGHT = 256


async def noop() -> None:
    return None


def noop_sync() -> None:
    return None


class FramedLocal(LocalEnvironmentExecutor):
    """A subclass: every call goes through frames and the in-process worker engine."""


def install(observer: str) -> None:
    if observer == "none":
        return
    from wove.observe import Observer, add_observer

    if observer == "noop":
        add_observer(Observer())
        return
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    import wove_otel

    class Drop(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(Drop()))
    trace.set_tracer_provider(provider)
    metrics.set_meter_provider(MeterProvider(metric_readers=[InMemoryMetricReader()]))
    wove_otel.instrument()


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


async def drive(call: Any, count: int, pids: list[int]) -> tuple[float, float]:
    """Keep IN_FLIGHT calls outstanding; return (calls per second, calls per CPU second of
    this process and the worker processes ``pids``)."""
    remaining = [count]

    async def loop() -> None:
        while remaining[0] > 0:
            remaining[0] -= 1
            await call()

    cpu = time.process_time() + proc_cpu(pids)
    started = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(IN_FLIGHT)))
    wall = time.perf_counter() - started
    return count / wall, count / max(time.process_time() + proc_cpu(pids) - cpu, 1e-9)


async def main(workload: str, count: int) -> tuple[float, float]:
    if workload == "stdio":
        definition: dict[str, Any] = {"executor": "stdio"}
        func: Any = noop
    elif workload == "local-frames":
        definition, func = {"executor": FramedLocal()}, noop_sync
    else:
        definition, func = {"executor": "local"}, noop
    async with ExecutorRuntime({"w": definition}) as runtime:
        executor: Any = runtime._environments["w"].executor  # type: ignore[attr-defined]  # a benchmark may peek
        pids = [worker.pid for worker in getattr(executor, "_workers", [])]
        await drive(lambda: runtime.call("w", func), min(count, 2000), pids)  # warm up
        runs = [await drive(lambda: runtime.call("w", func), count, pids) for _ in range(3)]
        return max(run[0] for run in runs), max(run[1] for run in runs)


if __name__ == "__main__":
    workload, count, observer = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    install(observer)
    throughput, per_cpu = asyncio.run(main(workload, count))
    print(json.dumps({"throughput": throughput, "per_cpu_second": per_cpu, "wove_file": wove.__file__,
                      "observe_module": importlib.util.find_spec("wove.observe") is not None}))
