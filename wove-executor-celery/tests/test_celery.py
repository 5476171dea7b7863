"""End to end on real ``celery worker`` processes: Redis (broker and results) and RabbitMQ (rpc results)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from wove.environment import DeliveryTimeoutError, EnvironmentExecutionError, ExecutorRuntime
from wove.errors import RemoteTraceback
from wove.testing import tasks

pytestmark = pytest.mark.timeout(90)


def _runtime(worker: Any, **config: Any) -> ExecutorRuntime:
    return ExecutorRuntime({"celery": {"executor": "celery", "executor_config": worker.executor_config(**config)}}, {})


async def _wait_for_file(path: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"{path} not written within {timeout}s"
        await asyncio.sleep(0.05)
    return path.read_text()


def _record_pid_then_sleep(log: str, seconds: float) -> Any:
    """A sync task (a closure, pickled by value) that appends its pid to ``log`` (one line per
    execution) and sleeps ``seconds`` on its first execution only."""

    def record_pid_then_sleep() -> int:
        import os
        import time

        with open(log, "a") as file:
            file.write(f"{os.getpid()}\n")
        with open(log) as file:
            first = len(file.read().split()) == 1
        if first:
            time.sleep(seconds)
        return os.getpid()

    return record_pid_then_sleep


async def test_sync_and_async_tasks_and_errors(worker: Any) -> None:
    async with _runtime(worker) as runtime:
        assert await runtime.call("celery", tasks.add, 40, 2) == 42
        assert await runtime.call("celery", tasks.echo, {"a": [1, 2]}) == {"a": [1, 2]}
        pid = await runtime.call("celery", tasks.pid)
        assert pid != os.getpid() and pid != worker.proc.pid  # a pool process of the worker
        with pytest.raises(tasks.ContractTaskError, match="async failure"):
            await runtime.call("celery", tasks.fail, "async failure")
        with pytest.raises(ValueError, match="sync failure") as info:
            await runtime.call("celery", tasks.fail_in_helper, "sync failure")
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback) and "failing_helper" in str(cause), cause


async def test_heartbeats_keep_a_long_task_alive(worker: Any) -> None:
    async with _runtime(worker) as runtime:
        assert await runtime.call_with("celery", tasks.blocking_sleep, (1.5,), delivery_heartbeat_seconds=0.6) == 1.5
        assert await runtime.call_with("celery", tasks.sleep, (1.5,), delivery_heartbeat_seconds=0.6) == "slept"


async def test_result_comes_back_through_the_result_backend_when_the_callback_is_unreachable(worker: Any) -> None:
    async with _runtime(worker, callback_url="http://127.0.0.1:9/") as runtime:
        assert await asyncio.wait_for(runtime.call("celery", tasks.add, 1, 2), 30) == 3
        with pytest.raises(ValueError, match="unreachable"):
            await asyncio.wait_for(runtime.call("celery", tasks.fail_in_helper, "unreachable"), 30)
        results = await asyncio.wait_for(asyncio.gather(*(runtime.call("celery", tasks.add, i, 1) for i in range(20))), 30)
        assert results == [i + 1 for i in range(20)]


async def test_delivery_timeout_revokes_and_terminates_a_sync_task(worker: Any, tmp_path: Path) -> None:
    marker = tmp_path / "finished"

    def sleep_then_mark() -> str:
        import time
        from pathlib import Path

        time.sleep(2.0)
        Path(str(marker)).write_text("finished")
        return "finished"

    async with _runtime(worker, terminate_on_cancel=True) as runtime:
        with pytest.raises(DeliveryTimeoutError):
            await runtime.call_with("celery", sleep_then_mark, (), delivery_timeout=0.7)
        await asyncio.sleep(2.5)
        assert not marker.exists(), "the terminated task ran to completion"
        assert await runtime.call("celery", tasks.add, 1, 1) == 2  # Celery replaced the pool process


async def test_killed_pool_process_with_requeue_runs_exactly_once_more(worker: Any, tmp_path: Path) -> None:
    log = tmp_path / "executions"
    async with _runtime(worker, max_deliveries=2) as runtime:
        call = asyncio.ensure_future(runtime.call_with(
            "celery", _record_pid_then_sleep(str(log), 30), (), delivery_orphan_policy="requeue"))
        first = int((await _wait_for_file(log, 30)).split()[0])
        os.kill(first, signal.SIGKILL)
        second = await asyncio.wait_for(call, 45)
    executions = log.read_text().split()
    assert len(executions) == 2 and int(executions[0]) == first and int(executions[1]) == second != first


async def test_killed_pool_process_ends_the_run_with_a_transport_error(worker: Any, tmp_path: Path) -> None:
    log = tmp_path / "executions"
    async with _runtime(worker) as runtime:
        call = asyncio.ensure_future(runtime.call("celery", _record_pid_then_sleep(str(log), 30)))
        os.kill(int((await _wait_for_file(log, 30)).split()[0]), signal.SIGKILL)
        with pytest.raises(EnvironmentExecutionError) as info:
            await asyncio.wait_for(call, 30)
    assert info.value.payload["source"] == "transport"
    message = str(info.value)
    assert "celery executor" in message and "WorkerLostError" in message and "died" in message, message
    await asyncio.sleep(0.5)
    assert len(log.read_text().split()) == 1
