"""End to end on a real ``taskiq worker`` (taskiq-redis): results, errors, cancellation through
the result backend, killed workers, idempotency keys as task ids, the result-backend channel,
many runs in flight."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from wove.environment import EnvironmentExecutionError, ExecutorRuntime
from wove.errors import DeliveryTimeoutError, RemoteTraceback
from wove.testing import tasks

pytestmark = pytest.mark.timeout(60)


def _runtime(worker: Any, **config: Any) -> ExecutorRuntime:
    return ExecutorRuntime({"tq": {"executor": "taskiq",
                                   "executor_config": {"broker": worker.broker_path, **config}}}, {})


async def _wait_for_lines(path: Path, count: int, timeout: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count:
            return lines
        assert time.monotonic() < deadline, f"{path} has {len(lines)} of {count} lines after {timeout}s"
        await asyncio.sleep(0.05)


def _counting_task(marker: str, sleep_first: float = 30.0) -> Any:
    """A closure (pickled by value): appends its pid to ``marker``; the first execution then sleeps."""

    def counted(value: int) -> str:
        import os
        import time
        from pathlib import Path

        path = Path(marker)
        earlier = path.read_text().splitlines() if path.exists() else []
        with path.open("a") as file:
            file.write(f"{os.getpid()}\n")
        if not earlier and sleep_first:
            time.sleep(sleep_first)
        return f"execution {len(earlier) + 1} of {value}"

    return counted


async def test_sync_and_async_tasks_and_the_tasks_own_exception(taskiq_worker: Any) -> None:
    async with _runtime(taskiq_worker) as runtime:
        assert await runtime.call("tq", tasks.add, 2, 3) == 5  # sync, on the worker's thread pool
        assert await runtime.call("tq", tasks.echo, {"k": [1, b"x"]}) == {"k": [1, b"x"]}  # async
        assert await runtime.call("tq", tasks.pid) not in (os.getpid(), taskiq_worker.pid)  # the worker child
        with pytest.raises(ValueError, match="helper broke") as info:
            await runtime.call("tq", tasks.fail_in_helper, "helper broke")
        assert isinstance(info.value.__cause__, RemoteTraceback)
        assert "failing_helper" in str(info.value.__cause__)


async def test_the_wove_2x_task_and_broker_objects(taskiq_worker: Any) -> None:
    module = importlib.import_module(taskiq_worker.module)
    task = module.broker.find_task("wove.run_backend_payload")
    assert task is not None
    await module.broker.startup()
    try:
        for config in ({"task": task}, {"broker": module.broker, "task_name": "wove.run_backend_payload"}):
            async with ExecutorRuntime({"tq": {"executor": "taskiq", "executor_config": config}}, {}) as runtime:
                assert await runtime.call("tq", tasks.add, 40, 2) == 42
    finally:
        await module.broker.shutdown()


async def _task_result(worker: Any, task_id: str, timeout: float) -> Any:
    from taskiq_redis import RedisAsyncResultBackend

    backend: Any = RedisAsyncResultBackend(worker.url)
    try:
        deadline = time.monotonic() + timeout
        while not await backend.is_result_ready(task_id):
            assert time.monotonic() < deadline, f"taskiq task {task_id} has no result after {timeout}s"
            await asyncio.sleep(0.1)
        return await backend.get_result(task_id)
    finally:
        await backend.shutdown()


async def test_delivery_timeout_cancels_the_task_on_the_worker(taskiq_worker: Any, tmp_path: Path) -> None:
    marker = tmp_path / "finished"
    key = f"timeout-{uuid.uuid4().hex}"
    async with _runtime(taskiq_worker) as runtime:
        with pytest.raises(DeliveryTimeoutError):
            await runtime.call_with("tq", tasks.sleep, (5.0, str(marker)), delivery_timeout=1.0,
                                    delivery_idempotency_key=key)
        result = await _task_result(taskiq_worker, key, 10)  # the task ended early, cancelled
        assert not result.is_err
        assert json.loads(result.return_value["event"])["type"] == "task_cancelled"
        assert await runtime.call("tq", tasks.add, 1, 1) == 2
    await asyncio.sleep(4.5)
    assert not marker.exists(), "the cancelled task ran to completion"


async def test_a_killed_worker_ends_the_run_with_a_transport_error(taskiq_worker: Any, tmp_path: Path) -> None:
    marker = tmp_path / "executions"
    listening = taskiq_worker.listening()
    async with _runtime(taskiq_worker) as runtime:
        call = asyncio.ensure_future(runtime.call("tq", _counting_task(str(marker)), 1))
        (pid,) = await _wait_for_lines(marker, 1)
        await asyncio.sleep(0.6)  # a beat was seen
        os.kill(int(pid), signal.SIGKILL)
        with pytest.raises(EnvironmentExecutionError) as info:
            await asyncio.wait_for(call, 20)
        assert info.value.payload["source"] == "transport"
        message = str(info.value)
        assert "taskiq task" in message and "stopped beating" in message and "worker process died" in message
        await asyncio.to_thread(taskiq_worker.wait_listening, listening + 1)  # taskiq restarted its child
        assert await runtime.call("tq", tasks.add, 2, 2) == 4
    assert len(marker.read_text().splitlines()) == 1


async def test_a_killed_worker_with_requeue_runs_exactly_once_more(taskiq_worker: Any, tmp_path: Path) -> None:
    marker = tmp_path / "executions"
    async with _runtime(taskiq_worker) as runtime:
        call = asyncio.ensure_future(runtime.call_with("tq", _counting_task(str(marker)), (7,),
                                                       delivery_orphan_policy="requeue"))
        (pid,) = await _wait_for_lines(marker, 1)
        await asyncio.sleep(0.6)
        os.kill(int(pid), signal.SIGKILL)
        assert await asyncio.wait_for(call, 30) == "execution 2 of 7"
    await asyncio.sleep(0.5)
    lines = marker.read_text().splitlines()
    assert len(lines) == 2 and lines[0] != lines[1]  # the second execution ran in the restarted child


async def test_repeated_idempotency_key_runs_once_as_that_task_id(taskiq_worker: Any, tmp_path: Path) -> None:
    marker = tmp_path / "executions"
    key = f"report-{uuid.uuid4().hex[:8]}"
    task = _counting_task(str(marker), sleep_first=0.5)
    async with _runtime(taskiq_worker) as runtime:
        first, second = await asyncio.gather(
            runtime.call_with("tq", task, (1,), delivery_idempotency_key=key),
            runtime.call_with("tq", task, (1,), delivery_idempotency_key=key),
        )
        assert first == second == "execution 1 of 1"
    async with _runtime(taskiq_worker) as runtime:  # another caller, later: the result backend has it
        assert await runtime.call_with("tq", task, (1,), delivery_idempotency_key=key) == "execution 1 of 1"
    assert len(marker.read_text().splitlines()) == 1
    result = await _task_result(taskiq_worker, key, 1)  # the key is the taskiq task id
    assert json.loads(result.return_value["event"])["type"] == "task_result"


async def test_results_come_back_through_the_result_backend_when_the_callback_is_unreachable(
        taskiq_worker: Any) -> None:
    async with _runtime(taskiq_worker, callback_url="http://127.0.0.1:9/") as runtime:
        assert await runtime.call("tq", tasks.add, 20, 22) == 42
        assert await runtime.call("tq", tasks.echo, "async") == "async"
        with pytest.raises(ValueError, match="unreachable") as info:
            await runtime.call("tq", tasks.fail_in_helper, "unreachable")
        assert "failing_helper" in str(info.value.__cause__)
        assert await asyncio.gather(*(runtime.call("tq", tasks.add, i, 1) for i in range(20))) == [
            i + 1 for i in range(20)]


@pytest.mark.timeout(90)
async def test_500_runs_with_64_in_flight(taskiq_worker: Any) -> None:
    definition = {"executor": "taskiq", "delivery_max_in_flight": 64,
                  "executor_config": {"broker": taskiq_worker.broker_path}}
    async with ExecutorRuntime({"tq": definition}, {}) as runtime:
        results = await asyncio.gather(*(runtime.call("tq", tasks.add, i, i) for i in range(500)))
    assert results == [2 * i for i in range(500)]
