"""The worker engine, driven directly with decoded frames."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from wove.errors import ProtocolError
from wove.protocol import TERMINAL_EVENTS
from wove.worker import WorkerEngine


class Collector:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.changed = asyncio.Event()

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self.changed.set()

    def of(self, run_id: str) -> list[str]:
        return [e["type"] for e in self.events if e.get("run_id") == run_id]

    async def terminal(self, run_id: str, timeout: float = 5.0) -> dict[str, Any]:
        async def wait() -> dict[str, Any]:
            while True:
                for event in self.events:
                    if event.get("run_id") == run_id and event["type"] in TERMINAL_EVENTS:
                        return event
                self.changed.clear()
                await self.changed.wait()

        return await asyncio.wait_for(wait(), timeout)


def absolute(x: int) -> int:
    return abs(x)


def frame(run_id: str, func: Any, args: dict[str, Any] | None = None, **delivery: Any) -> dict[str, Any]:
    return {"type": "run_task", "run_id": run_id, "task_id": run_id.split(":")[0], "callable": func,
            "args": args or {}, "delivery": delivery}


async def test_started_heartbeats_then_one_terminal() -> None:
    engine, sink = WorkerEngine(), Collector()
    await engine.submit(frame("t:1", asyncio.sleep, {"delay": 0.35, "result": 7}, delivery_heartbeat_seconds=0.3), sink)
    event = await sink.terminal("t:1")
    assert event["result"] == 7
    kinds = sink.of("t:1")
    assert kinds[0] == "task_started" and kinds[-1] == "task_result"
    assert kinds.count("heartbeat") >= 2  # every 0.1 s: well inside a 0.3 s window
    await engine.aclose()


async def test_sync_callables_run_in_threads_and_errors_are_normalized() -> None:
    engine, sink = WorkerEngine(), Collector()
    await engine.submit(frame("a:1", threading.get_ident), sink)
    await engine.submit(frame("b:1", float, {}), sink)
    await engine.submit(frame("c:1", bytes.fromhex, {}), sink)
    assert (await sink.terminal("a:1"))["result"] != threading.get_ident()
    assert (await sink.terminal("b:1"))["result"] == 0.0
    error = await sink.terminal("c:1")
    assert error["type"] == "task_error" and isinstance(error["exception"], TypeError)
    assert error["error"]["kind"] == "TypeError" and error["error"]["source"] == "task"
    assert "Traceback" in error["error"]["traceback"]
    await engine.aclose()


async def test_cancel_by_run_id_and_unknown_cancel_is_harmless() -> None:
    engine, sink = WorkerEngine(), Collector()
    await engine.submit(frame("s:1", asyncio.sleep, {"delay": 30}), sink)
    await asyncio.sleep(0.01)
    assert engine.cancel("s:1") is True
    assert engine.cancel("missing:1") is False
    assert (await sink.terminal("s:1"))["type"] == "task_cancelled"
    await asyncio.sleep(0.05)
    assert sink.of("s:1").count("task_cancelled") == 1 and engine.active == 0
    await engine.aclose()


async def test_idempotent_duplicates_attach_or_replay() -> None:
    engine, sink = WorkerEngine(), Collector()
    calls = []

    async def work(x: int) -> int:
        calls.append(x)
        await asyncio.sleep(0.1)
        return x * 10

    await engine.submit(frame("w:1", work, {"x": 1}, delivery_idempotency_key="job-1"), sink)
    await engine.submit(frame("w:2", work, {"x": 1}, delivery_idempotency_key="job-1"), sink)
    assert (await sink.terminal("w:1"))["result"] == 10
    assert (await sink.terminal("w:2"))["result"] == 10
    await engine.submit(frame("w:3", work, {"x": 1}, delivery_idempotency_key="job-1"), sink)
    assert (await sink.terminal("w:3"))["result"] == 10
    await engine.submit(frame("w:1", work, {"x": 1}), sink)  # the same run_id re-delivered
    assert [e for e in sink.events if e.get("run_id") == "w:1" and e["type"] == "task_result"].__len__() == 2
    assert calls == [1]
    await engine.aclose()


async def test_idempotency_cache_is_bounded() -> None:
    engine, sink = WorkerEngine(idempotency_cache_size=2), Collector()
    for i in range(5):
        await engine.submit(frame(f"k:{i}", absolute, {"x": i}, delivery_idempotency_key=f"key-{i}"), sink)
        await sink.terminal(f"k:{i}")
    assert engine.cached_results[0] == 2


async def test_concurrency_cap_applies_backpressure() -> None:
    engine, sink = WorkerEngine(max_concurrency=2, max_queued=1), Collector()
    running = 0
    peak = 0

    async def work() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1

    submitting = asyncio.ensure_future(asyncio.gather(*(engine.submit(frame(f"c:{i}", work), sink) for i in range(6))))
    await asyncio.sleep(0.01)
    assert not submitting.done(), "beyond max_concurrency + max_queued, submit waits"
    await asyncio.wait_for(submitting, 5)
    for i in range(6):
        await sink.terminal(f"c:{i}")
    assert peak == 2
    await engine.aclose()


async def test_malformed_commands_never_crash_the_engine() -> None:
    engine, sink = WorkerEngine(), Collector()
    await engine.handle(b"not json", sink)
    await engine.handle(b'{"type":"run_task","run_id":"bad:1","task_id":"bad","callable_pickle":"AAAA"}', sink)
    assert sink.events[0]["type"] == "log" and "malformed" in sink.events[0]["message"]
    assert sink.events[1]["type"] == "task_error" and sink.events[1]["run_id"] == "bad:1"
    assert sink.events[1]["error"]["kind"] == "ProtocolError"
    engine.reject(ProtocolError("x"), sink)
    await engine.submit(frame("ok:1", absolute, {"x": -3}), sink)
    assert (await sink.terminal("ok:1"))["result"] == 3


@pytest.mark.parametrize(("policy", "expected"), [
    ("cancel", ["task_started", "task_cancelled"]),
    ("fail", ["task_started", "task_error"]),
    ("requeue", ["task_started"]),
    ("detach", ["task_started", "task_result"]),
])
async def test_shutdown_ends_runs_by_policy(policy: str, expected: list[str]) -> None:
    engine, sink = WorkerEngine(), Collector()
    await engine.submit(frame("p:1", asyncio.sleep, {"delay": 0.2, "result": 1}, delivery_orphan_policy=policy), sink)
    await asyncio.sleep(0.02)
    await engine.shutdown(grace=2.0)
    assert sink.of("p:1") == expected
    await engine.submit(frame("late:1", absolute, {"x": 1}), sink)
    late = await sink.terminal("late:1")
    assert late["type"] == "task_error" and "shutting down" in late["error"]["message"]


async def test_a_sink_that_raises_does_not_break_the_engine(caplog: pytest.LogCaptureFixture) -> None:
    engine = WorkerEngine()

    def broken(event: dict[str, Any]) -> None:
        raise ConnectionResetError("client went away")

    await engine.submit(frame("x:1", absolute, {"x": 1}), broken)
    await asyncio.sleep(0.05)
    sink = Collector()
    await engine.submit(frame("y:1", absolute, {"x": -1}), sink)
    assert (await sink.terminal("y:1"))["result"] == 1
    assert "could not deliver" in caplog.text


async def test_the_same_run_delivered_twice_reaches_both_deliveries() -> None:
    engine, first, second = WorkerEngine(), Collector(), Collector()
    await engine.submit(frame("r:1", asyncio.sleep, {"delay": 0.1, "result": "once"}), first)
    await engine.submit(frame("r:1", asyncio.sleep, {"delay": 0.1, "result": "once"}), second)
    assert (await first.terminal("r:1"))["result"] == "once"
    assert (await second.terminal("r:1"))["result"] == "once"
    await engine.aclose()


def exhausted() -> None:
    next(iter(()))  # raises StopIteration


async def test_a_sync_task_raising_stop_iteration_fails_and_later_runs_still_finish() -> None:
    # An asyncio future refuses StopIteration (TypeError before Python 3.13): the thread's
    # outcome must still reach the loop, or this run and every later sync run would hang.
    engine, sink = WorkerEngine(), Collector()
    await engine.submit(frame("x:1", exhausted), sink)
    error = await sink.terminal("x:1")
    assert error["type"] == "task_error" and error["error"]["kind"] == "RuntimeError"
    assert isinstance(error["exception"].__cause__, StopIteration)
    assert "StopIteration" in error["error"]["message"]
    await engine.submit(frame("x:2", absolute, {"x": -3}), sink)
    assert (await sink.terminal("x:2"))["result"] == 3
    await engine.aclose()


async def test_a_sync_task_stopping_in_an_engine_workers_own_pool_fails_too() -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        engine, sink = WorkerEngine(threads=pool), Collector()
        await engine.submit(frame("y:1", exhausted), sink)
        error = await sink.terminal("y:1")
        assert error["error"]["kind"] == "RuntimeError" and isinstance(error["exception"].__cause__, StopIteration)
        await engine.aclose()


def returns_a_coroutine(x: int) -> Any:
    async def later() -> int:
        print("awaited", x)
        await asyncio.sleep(0.01)
        return x + 1

    print("called", x)
    return later()


async def test_a_sync_callable_returning_an_awaitable_is_awaited_with_its_output_captured() -> None:
    engine, sink = WorkerEngine(), Collector()
    await engine.submit(frame("r:1", returns_a_coroutine, {"x": 4}, delivery_capture_output=True), sink)
    assert (await sink.terminal("r:1"))["result"] == 5
    lines = "".join(e["message"] for e in sink.events if e["type"] == "log" and e.get("run_id") == "r:1")
    assert lines == "called 4\nawaited 4\n"
    assert sink.of("r:1")[-1] == "task_result"  # the output went before the terminal event
    await engine.aclose()


async def test_cancelling_a_running_sync_run_frees_its_slot_at_once() -> None:
    engine, sink = WorkerEngine(max_concurrency=1), Collector()
    release = threading.Event()
    await engine.submit(frame("b:1", release.wait, {"timeout": 10}), sink)
    await asyncio.sleep(0.05)
    assert engine.cancel("b:1") is True
    assert (await sink.terminal("b:1"))["type"] == "task_cancelled"
    await engine.submit(frame("b:2", absolute, {"x": -1}), sink)  # the one slot is free again
    assert (await sink.terminal("b:2"))["result"] == 1
    release.set()  # the abandoned call finishes in its thread; its result goes nowhere
    await asyncio.sleep(0.05)
    assert sink.of("b:1").count("task_cancelled") == 1 and "task_result" not in sink.of("b:1")
    await engine.aclose()


async def test_a_sync_run_in_progress_at_shutdown_ends_by_its_policy() -> None:
    engine, sink = WorkerEngine(), Collector()
    release = threading.Event()
    await engine.submit(frame("d:1", release.wait, {"timeout": 10}, delivery_orphan_policy="detach"), sink)
    await engine.submit(frame("f:1", release.wait, {"timeout": 10}, delivery_orphan_policy="fail"), sink)
    await asyncio.sleep(0.05)
    stopping = asyncio.ensure_future(engine.shutdown(grace=5.0))
    await asyncio.sleep(0.05)
    assert (await sink.terminal("f:1"))["error"]["kind"] == "DeliveryOrphanedError"
    assert not stopping.done(), "a detached sync run is waited for within the grace"
    release.set()
    await asyncio.wait_for(stopping, 5)
    assert (await sink.terminal("d:1"))["result"] is True


def returns_a_slow_coroutine() -> Any:
    async def later() -> str:
        await asyncio.sleep(0.2)
        return "finished"

    time.sleep(0.1)  # drain starts while the call still runs in its thread
    return later()


async def test_drain_waits_for_the_awaitable_a_sync_callable_returned() -> None:
    engine, sink = WorkerEngine(), Collector()
    await engine.submit(frame("a:1", returns_a_slow_coroutine), sink)
    await asyncio.wait_for(engine.drain(grace=5.0), 5)
    assert (await sink.terminal("a:1"))["result"] == "finished"
