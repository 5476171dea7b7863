"""End to end on a Temporal dev server with real Wove Temporal workers (subprocesses)."""

from __future__ import annotations

import asyncio
import time
import traceback
from pathlib import Path
from typing import Any

import pytest

from wove.environment import EnvironmentExecutionError, ExecutorRuntime
from wove.errors import DeliveryTimeoutError, RemoteTraceback
from wove.testing import tasks

pytestmark = pytest.mark.timeout(90)

UNREACHABLE = "http://127.0.0.1:9/"


def _runtime(address: str, queue: str, *, definition: dict[str, Any] | None = None, **config: Any) -> ExecutorRuntime:
    return ExecutorRuntime({"t": {"executor": "temporal", **(definition or {}),
                                  "executor_config": {"target_host": address, "task_queue": queue, **config}}}, {})


async def _wait_for_file(path: Path, timeout: float, lines: int = 1) -> list[str]:
    deadline = time.monotonic() + timeout
    while not path.exists() or len(path.read_text().splitlines()) < lines:
        assert time.monotonic() < deadline, f"{path} not written ({lines} lines) within {timeout}s"
        await asyncio.sleep(0.05)
    return path.read_text().splitlines()


async def _workflows(address: str, queue: str) -> dict[str, str]:
    """Workflow id -> status name of the workflows on ``queue``."""
    from temporalio.client import Client

    client = await Client.connect(address)
    found: dict[str, str] = {}
    async for execution in client.list_workflows(f"TaskQueue = '{queue}'"):
        found[execution.id] = execution.status.name if execution.status is not None else "?"
    return found


def _record_then_sleep(path: str, seconds: float, done: str | None = None) -> Any:
    """A sync closure (pickled by value: workers cannot import this test module) that appends
    its pid to ``path`` (one line per execution), sleeps, appends to ``done`` and returns."""

    def record_then_sleep() -> str:
        import os
        import time

        with open(path, "a") as file:
            file.write(f"{os.getpid()}\n")
        time.sleep(seconds)
        if done:
            with open(done, "a") as file:
                file.write("done\n")
        return f"finished in {os.getpid()}"

    return record_then_sleep


def _cancellable(started: str, cancelled: str) -> Any:
    """An async closure that writes ``started``, sleeps 30 s, and writes ``cancelled`` when cancelled."""

    async def cancellable() -> str:
        import asyncio
        from pathlib import Path

        Path(started).write_text("started")
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            Path(cancelled).write_text("cancelled")
            raise
        return "not cancelled"

    return cancellable


async def test_sync_and_async_tasks_and_errors(temporal_server: str, task_queue: str, worker: Any) -> None:
    async with _runtime(temporal_server, task_queue) as runtime:
        assert await runtime.call("t", tasks.add, 2, 3) == 5  # sync, on the worker's threads
        assert await runtime.call("t", tasks.echo, {"k": [1, b"x"]}) == {"k": [1, b"x"]}  # async
        assert await runtime.call("t", tasks.pid) == worker.pid
        with pytest.raises(tasks.ContractTaskError, match="from a Temporal worker"):
            await runtime.call("t", tasks.fail, "from a Temporal worker")
        with pytest.raises(ValueError, match="helper broke") as info:
            await runtime.call("t", tasks.fail_in_helper, "helper broke")
        cause = info.value.__cause__
        assert isinstance(cause, RemoteTraceback), cause
        assert "raise ValueError(message)  # failing_helper" in str(cause)
        assert any("environment 't'" in note for note in getattr(info.value, "__notes__", []))


@pytest.mark.parametrize("channel", ["auto", "engine"])
async def test_results_come_back_in_the_workflow_result_when_the_callback_is_unreachable(
        temporal_server: str, task_queue: str, worker: Any, channel: str) -> None:
    async with _runtime(temporal_server, task_queue, callback_url=UNREACHABLE, result_channel=channel) as runtime:
        assert await runtime.call("t", tasks.add, 20, 22) == 42
        assert await runtime.call("t", tasks.echo, "async") == "async"
        with pytest.raises(ValueError, match="unreachable caller") as info:
            await runtime.call("t", tasks.fail_in_helper, "unreachable caller")
        assert "failing_helper" in "".join(traceback.format_exception(info.value.__cause__))  # type: ignore[arg-type]
        results = await asyncio.gather(*(runtime.call("t", tasks.add, i, 1) for i in range(20)))
        assert results == [i + 1 for i in range(20)]


async def test_delivery_timeout_cancels_the_workflow_and_its_activity(
        temporal_server: str, task_queue: str, worker: Any, tmp_path: Path) -> None:
    started, cancelled = tmp_path / "started", tmp_path / "cancelled"
    async with _runtime(temporal_server, task_queue) as runtime:
        with pytest.raises(DeliveryTimeoutError, match="delivery_timeout"):
            await runtime.call_with("t", _cancellable(str(started), str(cancelled)), delivery_timeout=1.5)
        assert started.exists()
        # Temporal delivers the cancellation to the activity in a heartbeat's answer
        await _wait_for_file(cancelled, 15)
        assert await runtime.call("t", tasks.add, 1, 1) == 2
    deadline = time.monotonic() + 10
    while True:
        statuses = await _workflows(temporal_server, task_queue)
        cancelled_ids = [wid for wid, status in statuses.items() if status == "CANCELED"]
        if cancelled_ids or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.3)
    assert len(cancelled_ids) == 1 and cancelled_ids[0].startswith("wove-cancellable:"), statuses


async def test_idempotency_key_is_the_workflow_id(
        temporal_server: str, task_queue: str, worker: Any, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    task = _record_then_sleep(str(runs), 1.0)
    async with _runtime(temporal_server, task_queue, workflow_id_prefix="keyed") as runtime:
        first, second = await asyncio.gather(
            runtime.call_with("t", task, delivery_idempotency_key="report-42"),
            runtime.call_with("t", task, delivery_idempotency_key="report-42"))
        assert first == second == f"finished in {worker.pid}"
        # after it finished: the finished workflow's outcome, no new execution
        assert await runtime.call_with("t", task, delivery_idempotency_key="report-42") == first
        assert len(runs.read_text().splitlines()) == 1, "a duplicate submission ran the task again"
        # another key is another workflow
        assert await runtime.call_with("t", task, delivery_idempotency_key="report-43") == first
    assert len(runs.read_text().splitlines()) == 2
    statuses = await _workflows(temporal_server, task_queue)
    assert statuses == {"keyed-report-42": "COMPLETED", "keyed-report-43": "COMPLETED"}


async def test_killed_worker_ends_the_run_with_an_error_naming_temporal(
        temporal_server: str, task_queue: str, start_worker: Any, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    first = start_worker()
    async with _runtime(temporal_server, task_queue, activity_heartbeat_timeout=2.0) as runtime:
        call = asyncio.ensure_future(runtime.call("t", _record_then_sleep(str(runs), 60)))
        await _wait_for_file(runs, 30)
        first.kill()
        start_worker()  # a supervisor restarts it: that worker runs the workflow's next step
        started = time.monotonic()
        with pytest.raises(EnvironmentExecutionError) as info:
            await asyncio.wait_for(call, 45)
        message = str(info.value)
        assert "Temporal workflow 'wove-record_then_sleep:" in message, message
        assert "stopped heartbeating" in message and "activity_heartbeat_timeout" in message, message
        assert time.monotonic() - started < 40
        assert len(runs.read_text().splitlines()) == 1


async def test_killed_worker_with_requeue_runs_once_more(
        temporal_server: str, task_queue: str, start_worker: Any, tmp_path: Path) -> None:
    runs, done = tmp_path / "runs", tmp_path / "done"
    first = start_worker()
    async with _runtime(temporal_server, task_queue, activity_heartbeat_timeout=2.0,
                        definition={"delivery_orphan_policy": "requeue"}) as runtime:
        call = asyncio.ensure_future(runtime.call("t", _record_then_sleep(str(runs), 3.0, str(done))))
        await _wait_for_file(runs, 30)
        first.kill()
        second = start_worker()
        assert await asyncio.wait_for(call, 60) == f"finished in {second.pid}"
    assert [int(pid) for pid in runs.read_text().splitlines()] == [first.pid, second.pid]
    assert done.read_text().splitlines() == ["done"], "the re-delivered run completed exactly once"
    statuses = await _workflows(temporal_server, task_queue)
    assert sorted(statuses.values()) == ["COMPLETED", "FAILED"], statuses


@pytest.mark.timeout(120)
async def test_500_tasks_with_64_in_flight(temporal_server: str, task_queue: str, worker: Any) -> None:
    async with _runtime(temporal_server, task_queue, definition={"delivery_max_in_flight": 64}) as runtime:
        results = await asyncio.gather(*(runtime.call("t", tasks.add, i, i) for i in range(250)),
                                       *(runtime.call("t", tasks.echo, i) for i in range(250)))
        assert results == [2 * i for i in range(250)] + list(range(250))


async def test_worker_sigterm_drains_and_exits_zero(
        temporal_server: str, task_queue: str, worker: Any) -> None:
    async with _runtime(temporal_server, task_queue) as runtime:
        call = asyncio.ensure_future(runtime.call("t", tasks.blocking_sleep, 0.5))
        await asyncio.sleep(0.3)
        code = await asyncio.get_running_loop().run_in_executor(None, worker.stop)
        assert code == 0
        assert await call == 0.5, "a run in flight finishes within the grace period"


async def test_unreachable_server_fails_at_start_naming_it() -> None:
    with pytest.raises(OSError, match=r"cannot connect to the Temporal server at 127\.0\.0\.1:9 within "
                                      r"executor_config\.connect_timeout=2 s"):
        async with _runtime("127.0.0.1:9", "q", connect_timeout=2):
            pass


async def test_killed_only_worker_ends_the_run_within_no_worker_timeout(
        temporal_server: str, task_queue: str, start_worker: Any, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    only = start_worker()
    async with _runtime(temporal_server, task_queue, activity_heartbeat_timeout=1.0, no_worker_timeout=2.0) as runtime:
        call = asyncio.ensure_future(runtime.call("t", _record_then_sleep(str(runs), 60)))
        await _wait_for_file(runs, 30)
        only.kill()  # and nobody restarts it
        with pytest.raises(EnvironmentExecutionError) as info:
            await asyncio.wait_for(call, 30)
        message = str(info.value)
        assert "no worker picked up its next step" in message and "no_worker_timeout=2" in message, message
        assert f"--task-queue {task_queue}" in message, message
    statuses = await _workflows(temporal_server, task_queue)
    assert list(statuses.values()) == ["TERMINATED"], statuses


async def test_a_task_queue_nobody_polls_fails_the_run_naming_it(temporal_server: str) -> None:
    async with _runtime(temporal_server, "nobody-polls-this", no_worker_timeout=1.0) as runtime:
        with pytest.raises(EnvironmentExecutionError, match=r"task queue 'nobody-polls-this'.*no worker picked up"):
            await asyncio.wait_for(runtime.call("t", tasks.add, 1, 2), 30)


async def test_cancelling_a_duplicate_leaves_the_shared_workflow_running(
        temporal_server: str, task_queue: str, worker: Any, tmp_path: Path) -> None:
    runs, done = tmp_path / "runs", tmp_path / "done"
    task = _record_then_sleep(str(runs), 2.0, str(done))
    async with _runtime(temporal_server, task_queue, workflow_id_prefix="shared") as runtime:
        first = asyncio.ensure_future(runtime.call_with("t", task, delivery_idempotency_key="k"))
        await _wait_for_file(runs, 30)
        duplicate = asyncio.ensure_future(runtime.call_with("t", task, delivery_idempotency_key="k"))
        await asyncio.sleep(0.5)
        duplicate.cancel()
        with pytest.raises(asyncio.CancelledError):
            await duplicate
        assert (await first).startswith("finished in ")
    assert done.read_text().splitlines() == ["done"] and len(runs.read_text().splitlines()) == 1
    assert await _workflows(temporal_server, task_queue) == {"shared-k": "COMPLETED"}
