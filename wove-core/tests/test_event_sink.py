"""A FrameExecutor hands its events to the runtime as they arrive (deliver_events_to).

The executor here is a transport of its own: it answers each run_task on a later loop
turn, as a worker over a socket would, through the documented subclass hooks.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from wove.environment import ExecutorRuntime
from wove.transport import FrameExecutor

pytestmark = pytest.mark.timeout(30)


def double(x: int) -> int:
    return 2 * x


class InProcess(FrameExecutor):
    """Answers every run_task queued in one loop turn in a single callback."""

    executor_name = "in-process"

    def __init__(self) -> None:
        super().__init__()
        self.sinks: list[Any] = []
        self.outbox: list[dict[str, Any]] = []
        self.answered_at_once = 0

    def deliver_events_to(self, sink: Any) -> None:
        self.sinks.append(sink)
        super().deliver_events_to(sink)

    async def start(self, *, environment_name: str, environment_config: dict[str, Any],
                    run_config: dict[str, Any]) -> None:
        self._open_events(environment_name, environment_config.get("executor_config") or {})

    async def send(self, frame: dict[str, Any]) -> None:
        if frame["type"] != "run_task":
            return
        self._track(frame)
        if not self.outbox:
            asyncio.get_running_loop().call_soon(self.answer)
        self.outbox.append(frame)

    def answer(self) -> None:
        batch, self.outbox = self.outbox, []
        self.answered_at_once = max(self.answered_at_once, len(batch))
        for frame in batch:
            self._emit({"type": "task_started", "run_id": frame["run_id"], "task_id": frame["task_id"]})
            self._emit({"type": "task_result", "run_id": frame["run_id"], "task_id": frame["task_id"],
                        "result": frame["callable"](**frame["args"])})

    def push(self, event: dict[str, Any]) -> None:
        """An event from the other side, as the transport's reader would pass it on."""
        self._emit(event)

    def fail(self, exc: BaseException) -> None:
        """The transport broke: ``recv()`` raises ``exc``."""
        self._fail(exc)

    async def stop(self) -> None:
        pass


async def _run(runtime: ExecutorRuntime, x: int) -> Any:
    return await runtime.run_task(task_name="double", task_func=double, task_args={"x": x},
                                  task_info={"environment": "here"})


async def test_the_runtime_takes_events_as_they_arrive_and_lets_go_at_stop() -> None:
    executor = InProcess()
    runtime = ExecutorRuntime({"here": {"executor": executor}}, {})
    await runtime.start()
    assert len(executor.sinks) == 1 and callable(executor.sinks[0])
    assert await _run(runtime, 21) == 42
    await runtime.stop()
    assert executor.sinks[-1] is None  # events queue for recv() again


async def test_a_burst_of_results_settles_over_several_loop_turns_and_loses_none() -> None:
    executor = InProcess()
    runtime = ExecutorRuntime({"here": {"executor": executor}}, {})
    await runtime.start()
    try:
        runs = [asyncio.ensure_future(_run(runtime, x)) for x in range(300)]
        while not executor.outbox:  # every run sent, answered together on the next turn
            await asyncio.sleep(0)
        done_per_turn = []
        while not all(run.done() for run in runs):
            await asyncio.sleep(0)
            done_per_turn.append(sum(run.done() for run in runs))
        assert executor.answered_at_once == 300
        assert [run.result() for run in runs] == [2 * x for x in range(300)]
        # the callers resume a slice at a time, not all 300 in one turn
        assert len(done_per_turn) > 2 and done_per_turn[0] < 300
    finally:
        await runtime.stop()


async def test_events_queued_before_the_runtime_attached_are_not_lost() -> None:
    executor = InProcess()
    await executor.start(environment_name="here", environment_config={}, run_config={})
    executor.push({"type": "log", "message": "before"})
    taken: list[dict[str, Any]] = []
    executor.deliver_events_to(taken.append)
    executor.push({"type": "log", "message": "after"})
    assert [event["message"] for event in taken] == ["before", "after"]
    executor.deliver_events_to(None)
    executor.push({"type": "log", "message": "queued"})
    assert (await asyncio.wait_for(executor.recv(), 5))["message"] == "queued"


async def test_a_failure_queued_before_the_runtime_attached_still_reaches_recv_in_its_place() -> None:
    executor = InProcess()
    await executor.start(environment_name="here", environment_config={}, run_config={})
    executor.push({"type": "log", "message": "before"})
    executor.fail(ConnectionError("the worker went away"))
    executor.push({"type": "log", "message": "after the failure"})
    taken: list[dict[str, Any]] = []
    executor.deliver_events_to(taken.append)
    assert [event["message"] for event in taken] == ["before"]
    with pytest.raises(ConnectionError, match="the worker went away"):
        await asyncio.wait_for(executor.recv(), 5)
    assert (await asyncio.wait_for(executor.recv(), 5))["message"] == "after the failure"
