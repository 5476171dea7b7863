"""wove.observe: the run lifecycle hook, on the local executor, a real stdio worker and the codec."""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from wove.environment import DeliveryOrphanedError, DeliveryTimeoutError, ExecutorRuntime
from wove.observe import (
    OUTCOMES,
    ExecutionInfo,
    Observer,
    RunInfo,
    add_observer,
    observers,
    outcome_of,
    remove_observer,
)
from wove.protocol import decode_command, encode_frame
from wove.session import WorkerService
from wove.testing import tasks
from wove.worker import WorkerEngine

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
#: set by the recorder in execution_started: proves the callable runs in that context
seen_by_task: contextvars.ContextVar[str] = contextvars.ContextVar("seen_by_task", default="unset")


class Recorder(Observer):
    """Records every hook call as (hook, run_id, detail)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.tasks: dict[tuple[str, str], asyncio.Task[Any] | None] = {}
        self.executions: list[ExecutionInfo] = []
        self.finished: dict[str, tuple[str, BaseException | None, RunInfo]] = {}

    def _note(self, hook: str, run_id: str, detail: Any = None) -> None:
        self.calls.append((hook, run_id, detail))
        try:
            self.tasks[(hook, run_id)] = asyncio.current_task()
        except RuntimeError:
            self.tasks[(hook, run_id)] = None

    def hooks(self, run_id: str) -> list[str]:
        return [hook for hook, rid, _ in self.calls if rid == run_id]

    def run_submitted(self, run: RunInfo) -> None:
        run.carrier["traceparent"] = TRACEPARENT
        run.carrier["tracestate"] = "wove=1"
        self._note("run_submitted", run.run_id, (run.environment, run.executor, run.task, run.inline))

    def run_sent(self, run: RunInfo) -> None:
        self._note("run_sent", run.run_id, run.request_size)

    def run_started(self, run: RunInfo) -> None:
        self._note("run_started", run.run_id)

    def run_heartbeat(self, run: RunInfo) -> None:
        self._note("run_heartbeat", run.run_id)

    def run_redelivered(self, run: RunInfo, reason: str) -> None:
        self._note("run_redelivered", run.run_id, reason)

    def run_timed_out(self, run: RunInfo, message: str) -> None:
        self._note("run_timed_out", run.run_id, message)

    def run_cancelled(self, run: RunInfo, message: str) -> None:
        self._note("run_cancelled", run.run_id, message)

    def run_finished(self, run: RunInfo, outcome: str, error: BaseException | None) -> None:
        self._note("run_finished", run.run_id, outcome)
        self.finished[run.run_id] = (outcome, error, run)

    def execution_started(self, execution: ExecutionInfo) -> None:
        execution.data["token"] = seen_by_task.set(f"{execution.run_id} {execution.carrier.get('traceparent')}")
        self.executions.append(execution)
        self._note("execution_started", execution.run_id, dict(execution.carrier))

    def execution_finished(self, execution: ExecutionInfo, outcome: str, error: BaseException | None) -> None:
        seen_by_task.reset(execution.data.pop("token"))
        self._note("execution_finished", execution.run_id, (outcome, type(error).__name__ if error else None))


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    observer = Recorder()
    add_observer(observer)
    try:
        yield observer
    finally:
        remove_observer(observer)


def read_context() -> str:
    return seen_by_task.get()


async def aread_context() -> str:
    return seen_by_task.get()


def test_importing_wove_imports_no_opentelemetry_and_installs_no_observer() -> None:
    code = ("import sys, wove, wove.environment, wove.observe, wove.worker, wove.session, wove.transport\n"
            "import json; print(json.dumps([sorted(m for m in sys.modules if 'opentelemetry' in m), "
            "len(wove.observe.observers())]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stdout) == [[], 0]


def test_add_and_remove_observers() -> None:
    first, second = Recorder(), Recorder()
    with pytest.raises(TypeError, match=r"add_observer\(\) needs an observer.*got int"):
        add_observer(5)  # type: ignore[arg-type]
    add_observer(first)
    add_observer(first)
    add_observer(second)
    try:
        assert observers()[-2:] == (first, second)
        assert observers().count(first) == 1
    finally:
        assert remove_observer(first) and remove_observer(second)
    assert not remove_observer(first)
    assert first not in observers()


def test_outcomes_of_errors() -> None:
    assert outcome_of(None) == "ok"
    assert outcome_of(DeliveryTimeoutError("late")) == "timeout"
    assert outcome_of(DeliveryOrphanedError("gone")) == "orphaned"
    assert outcome_of(asyncio.CancelledError()) == "cancelled"
    assert outcome_of(ValueError("no")) == "error"
    assert set(OUTCOMES) == {"ok", "error", "cancelled", "timeout", "orphaned"}


async def test_inline_local_call_is_submitted_and_finished_in_the_callers_task(recorder: Recorder) -> None:
    async with ExecutorRuntime({"here": {"executor": "local"}}) as runtime:
        assert await runtime.call("here", tasks.echo, 5) == 5
    (run_id,) = {rid for _, rid, _ in recorder.calls}
    assert recorder.hooks(run_id) == ["run_submitted", "run_finished"]
    assert recorder.calls[0][2] == ("here", "local", "echo", True)
    me = asyncio.current_task()
    assert recorder.tasks[("run_submitted", run_id)] is me and recorder.tasks[("run_finished", run_id)] is me
    assert recorder.finished[run_id][:2] == ("ok", None)


async def test_sync_local_run_carries_the_carrier_to_the_execution_context(recorder: Recorder) -> None:
    async with ExecutorRuntime({"here": {"executor": "local"}}) as runtime:
        future = runtime.submit("here", read_context)
        seen = await future
    run_id = future.run_id
    # the sync callable ran in a thread with the context execution_started set
    assert seen == f"{run_id} {TRACEPARENT}"
    assert recorder.hooks(run_id) == ["run_submitted", "run_sent", "execution_started", "execution_finished",
                                      "run_finished"]
    assert recorder.executions[0].carrier == {"traceparent": TRACEPARENT, "tracestate": "wove=1"}
    assert recorder.executions[0].worker == "local:here"
    # submit(): the hooks run in the run's own task, the same one for both ends
    assert recorder.tasks[("run_submitted", run_id)] is recorder.tasks[("run_finished", run_id)]
    assert ("execution_finished", run_id, ("ok", None)) in recorder.calls


async def test_errors_timeouts_and_cancellations_are_outcomes(recorder: Recorder) -> None:
    async with ExecutorRuntime({"here": {"executor": "local"}}) as runtime:
        with pytest.raises(tasks.ContractTaskError, match="boom"):
            await runtime.call("here", tasks.fail, "boom")
        with pytest.raises(DeliveryTimeoutError):
            await runtime.call_with("here", tasks.sleep, (5.0,), delivery_timeout=0.05)
        running = runtime.submit("here", tasks.sleep, 5.0)
        await asyncio.sleep(0.05)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
    outcomes = {info[2].task: (info[0], type(info[1]).__name__) for info in recorder.finished.values()}
    assert outcomes["fail"] == ("error", "ContractTaskError")
    sleeps = sorted(info[0] for info in recorder.finished.values() if info[2].task == "sleep")
    assert sleeps == ["cancelled", "timeout"]
    timed_out = [rid for hook, rid, _ in recorder.calls if hook == "run_timed_out"]
    cancelled = [rid for hook, rid, _ in recorder.calls if hook == "run_cancelled"]
    assert len(timed_out) == 1 and recorder.finished[timed_out[0]][0] == "timeout"
    assert len(cancelled) == 1 and recorder.finished[cancelled[0]][0] == "cancelled"
    assert recorder.hooks(timed_out[0])[-2:] == ["run_timed_out", "run_finished"]


async def test_a_run_pending_at_stop_is_orphaned(recorder: Recorder) -> None:
    runtime = ExecutorRuntime({"here": {"executor": "local", "delivery_orphan_policy": "fail"}})
    await runtime.start()
    pending = runtime.submit("here", tasks.blocking_sleep, 0.5)
    await asyncio.sleep(0.05)
    await runtime.stop()
    with pytest.raises(DeliveryOrphanedError):
        await pending
    assert recorder.finished[pending.run_id][0] == "orphaned"


async def test_a_failing_observer_does_not_affect_runs(recorder: Recorder, caplog: pytest.LogCaptureFixture) -> None:
    class Broken(Observer):
        def run_submitted(self, run: RunInfo) -> None:
            raise ZeroDivisionError("observer bug")

    broken = Broken()
    add_observer(broken)
    try:
        with caplog.at_level(logging.DEBUG, logger="wove.observe"):
            async with ExecutorRuntime({"here": {"executor": "local"}}) as runtime:
                assert await runtime.call("here", tasks.add, 1, 2) == 3
                assert await runtime.call("here", tasks.add, 2, 2) == 4
    finally:
        remove_observer(broken)
    failures = [r for r in caplog.records if "failed in run_submitted" in r.getMessage()]
    assert [r.levelno for r in failures] == [logging.ERROR, logging.DEBUG]  # logged once, then quietly
    assert [outcome for outcome, _, _ in recorder.finished.values()] == ["ok", "ok"]


@pytest.mark.integration
async def test_stdio_run_reports_sent_size_started_and_heartbeats(recorder: Recorder) -> None:
    env = {"w": {"executor": "stdio", "delivery_heartbeat_seconds": 0.15}}
    async with ExecutorRuntime(env) as runtime:
        future = runtime.submit("w", tasks.sleep, 0.4)
        await future
    hooks = recorder.hooks(future.run_id)
    assert hooks[:3] == ["run_submitted", "run_sent", "run_started"]
    assert "run_heartbeat" in hooks and hooks[-1] == "run_finished"
    sizes = [detail for hook, rid, detail in recorder.calls if hook == "run_sent" and rid == future.run_id]
    assert isinstance(sizes[0], int) and sizes[0] > 100  # bytes of the encoded run_task
    assert recorder.finished[future.run_id][2].deliveries == 1


def _crash_once(marker: str) -> int:
    if not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        os._exit(7)
    return os.getpid()


@pytest.mark.integration
async def test_stdio_redelivery_is_reported(recorder: Recorder, tmp_path: Path) -> None:
    marker = tmp_path / "crashed"
    async with ExecutorRuntime({"w": {"executor": "stdio"}}) as runtime:
        future = runtime.submit_with("w", _crash_once, (str(marker),), delivery_orphan_policy="requeue")
        await future
    reasons = [detail for hook, rid, detail in recorder.calls if hook == "run_redelivered" and rid == future.run_id]
    assert len(reasons) == 1 and "exit code 7" in reasons[0]
    outcome, _error, run = recorder.finished[future.run_id]
    assert (outcome, run.deliveries) == ("ok", 2)


def test_trace_fields_survive_the_codec() -> None:
    frame = {"type": "run_task", "run_id": "add:1", "task_id": "add", "callable": tasks.add,
             "args": {"a": 1, "b": 2}, "delivery": {}, "traceparent": TRACEPARENT, "tracestate": "wove=1"}
    decoded = decode_command(encode_frame(frame))
    assert (decoded["traceparent"], decoded["tracestate"]) == (TRACEPARENT, "wove=1")


async def test_a_strict_worker_session_passes_the_trace_context_to_the_execution(recorder: Recorder) -> None:
    """What every worker service does with a request body (http, grpc and websocket shells,
    the stdio worker, the backend runner): strict decoding keeps the extension fields."""
    events: list[dict[str, Any]] = []
    engine = WorkerEngine(name="probe")
    service = WorkerService(engine, name="probe")
    session = service.session("test", emit=events.append)
    body = encode_frame({"type": "run_task", "run_id": "read_context:1", "task_id": "read_context",
                         "callable": read_context, "args": {}, "delivery": {}, "traceparent": TRACEPARENT,
                         "tracestate": "wove=1", "unknown_extension": [1]})
    await session.receive(body, strict=True)
    for _ in range(200):
        if any(event["type"] == "task_result" for event in events):
            break
        await asyncio.sleep(0.01)
    await engine.aclose()
    (result,) = [event for event in events if event["type"] == "task_result"]
    assert result["result"] == f"read_context:1 {TRACEPARENT}"
    assert recorder.executions[-1].carrier == {"traceparent": TRACEPARENT, "tracestate": "wove=1"}
    assert recorder.executions[-1].worker == "probe"


async def test_a_malformed_trace_field_is_ignored(recorder: Recorder) -> None:
    events: list[dict[str, Any]] = []
    engine = WorkerEngine(name="probe")
    await engine.submit({"type": "run_task", "run_id": "aread_context:2", "task_id": "aread_context",
                         "callable": aread_context, "args": {}, "delivery": {}, "traceparent": 42}, events.append)
    for _ in range(200):
        if any(event["type"] == "task_result" for event in events):
            break
        await asyncio.sleep(0.01)
    await engine.aclose()
    assert [e["result"] for e in events if e["type"] == "task_result"] == ["aread_context:2 None"]
    assert recorder.executions[-1].carrier == {}


@pytest.mark.integration
async def test_streamed_runs_are_observed_and_carry_the_trace_context(recorder: Recorder, tmp_path: Path) -> None:
    async with ExecutorRuntime({"w": {"executor": "stdio"}}) as runtime:
        stream = runtime.stream("w", tasks.count_up, 3, str(tmp_path / "counter"))
        assert [item async for item in stream] == [0, 1, 2]
        early = runtime.stream("w", tasks.count_up, 100, str(tmp_path / "other"))
        async for _item in early:
            break
        await early.aclose()
    outcome, error, run = recorder.finished[stream.run_id]
    assert (outcome, error, run.streamed) == ("ok", None, True)
    assert recorder.hooks(stream.run_id)[:3] == ["run_submitted", "run_sent", "run_started"]
    assert recorder.finished[early.run_id][0] == "cancelled"  # the consumer stopped early
