"""The worker engine's result cache is bounded by bytes and time, and sync runs that were
given up on never keep the process alive."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from wove.worker import WorkerEngine

MiB = 1024 * 1024


def _blob(size: int) -> bytes:
    return b"\0" * size


def _run(run_id: str, func: Any, args: dict[str, Any], **delivery: Any) -> dict[str, Any]:
    return {"type": "run_task", "run_id": run_id, "task_id": run_id.split(":")[0], "callable": func,
            "args": args, "delivery": delivery}


async def _finish(engine: WorkerEngine, frame: dict[str, Any]) -> dict[str, Any]:
    done: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    def sink(event: dict[str, Any]) -> None:
        if event["type"] in ("task_result", "task_error", "task_cancelled") and not done.done():
            done.set_result(event)

    await engine.submit(frame, sink)
    return await asyncio.wait_for(done, 10)


async def test_large_results_are_bounded_by_bytes() -> None:
    engine = WorkerEngine(idempotency_cache_bytes=48 * MiB)
    try:
        for i in range(10):
            event = await _finish(engine, _run(f"blob:{i}", _blob, {"size": 20 * MiB}))
            assert len(event["result"]) == 20 * MiB
            del event
        entries, cached = engine.cached_results
        assert cached <= 48 * MiB, f"{cached} bytes kept for {entries} entries"
        assert entries >= 1, "the newest result is still there for a re-delivery"
    finally:
        await engine.aclose()


async def test_a_redelivery_within_the_window_gets_the_kept_result() -> None:
    calls: list[int] = []

    def count(size: int) -> bytes:
        calls.append(size)
        return b"\0" * size

    engine = WorkerEngine()
    try:
        first = await _finish(engine, _run("count:1", count, {"size": 2 * MiB}))
        again = await _finish(engine, _run("count:1", count, {"size": 2 * MiB}))
        assert again["type"] == "task_result" and again["result"] == first["result"]
        assert calls == [2 * MiB], "the re-delivered run did not execute a second time"
    finally:
        await engine.aclose()


async def test_large_results_expire_on_a_timer() -> None:
    engine = WorkerEngine(large_result_bytes=MiB, large_result_ttl=0.2)
    try:
        await _finish(engine, _run("blob:big", _blob, {"size": 4 * MiB}))
        await _finish(engine, _run("blob:small", _blob, {"size": 16}))
        assert engine.cached_results[0] == 2
        for _ in range(100):  # the sweep runs without any lookup asking for the entry
            await asyncio.sleep(0.1)
            if engine.cached_results[0] == 1:
                break
        entries, cached = engine.cached_results
        assert entries == 1 and cached < MiB, "the large result left, the small one stays for its full TTL"
    finally:
        await engine.aclose()


async def test_a_result_larger_than_the_bound_is_not_kept() -> None:
    engine = WorkerEngine(idempotency_cache_bytes=MiB)
    try:
        await _finish(engine, _run("blob:huge", _blob, {"size": 3 * MiB}))
        assert engine.cached_results == (0, 0)
    finally:
        await engine.aclose()


@pytest.mark.parametrize("setting", ["idempotency_cache_bytes", "large_result_bytes"])
def test_invalid_bounds_are_rejected(setting: str) -> None:
    with pytest.raises(ValueError, match=f"{setting} must be a non-negative integer"):
        WorkerEngine(**{setting: -1})


def test_a_stuck_sync_task_does_not_keep_a_local_script_alive() -> None:
    script = textwrap.dedent("""
        import asyncio
        from wove.environment import DeliveryTimeoutError, ExecutorRuntime
        from wove.testing import tasks

        async def main():
            envs = {"local": {"executor": "local", "delivery_timeout": 0.3}}
            async with ExecutorRuntime(envs, {}) as runtime:
                try:
                    await runtime.call("local", tasks.blocking_sleep, 3600)
                except DeliveryTimeoutError:
                    print("timed out", flush=True)

        asyncio.run(main())
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "timed out"


async def test_many_sync_calls_in_flight_each_get_their_own_outcome() -> None:
    """Sync results come back to the loop in batches: none is lost, swapped or duplicated."""

    def square_or_fail(x: int) -> int:
        if x % 97 == 0:
            raise ValueError(f"bad {x}")
        return x * x

    from wove.environment import ExecutorRuntime

    async with ExecutorRuntime({"l": {"executor": "local"}}, {}) as runtime:
        outcomes = await asyncio.gather(*(runtime.call("l", square_or_fail, i) for i in range(3000)),
                                        return_exceptions=True)
    for i, outcome in enumerate(outcomes):
        if i % 97 == 0:
            assert isinstance(outcome, ValueError) and str(outcome) == f"bad {i}"
        else:
            assert outcome == i * i
