"""End to end on Dask: worker processes, task errors, cancellation, killed workers, CLI cluster."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from wove.environment import EnvironmentExecutionError, ExecutorRuntime
from wove.testing import tasks

pytestmark = pytest.mark.timeout(90)


def _runtime(address: str, **config: Any) -> ExecutorRuntime:
    return ExecutorRuntime({"dask": {"executor": "dask", "executor_config": {"address": address, **config}}}, {})


async def _wait_for_file(path: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"{path} not written within {timeout}s"
        await asyncio.sleep(0.05)
    return path.read_text()


def _pid_then_sleep(pid_file: str) -> Any:
    """A closure (pickled by value: the workers cannot import this test module)."""

    def pid_then_sleep() -> str:
        import os
        import time
        from pathlib import Path

        marker = Path(pid_file)
        if marker.exists():
            return f"re-delivered to {os.getpid()}"
        marker.write_text(str(os.getpid()))
        time.sleep(30)
        return "not killed"

    return pid_then_sleep


async def test_results_and_errors_from_worker_processes(process_cluster: Any) -> None:
    async with _runtime(process_cluster.scheduler_address) as runtime:
        pids = set(await asyncio.gather(*(runtime.call("dask", tasks.blocking_sleep, 0.2) for _ in range(4))))
        worker_pid = await runtime.call("dask", tasks.pid)
        assert worker_pid != os.getpid()
        assert pids == {0.2}
        with pytest.raises(tasks.ContractTaskError, match="from a worker"):
            await runtime.call("dask", tasks.fail, "from a worker")
        assert await asyncio.gather(*(runtime.call("dask", tasks.add, i, i) for i in range(50))) == [
            2 * i for i in range(50)
        ]


async def test_cancellation_stops_the_worker_side_task(process_cluster: Any, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    async with _runtime(process_cluster.scheduler_address) as runtime:
        call = asyncio.ensure_future(runtime.call("dask", tasks.sleep, 1.5, str(marker)))
        await asyncio.sleep(0.5)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await asyncio.sleep(1.5)
        assert not marker.exists(), "the cancelled task ran to completion on the worker"
        assert await runtime.call("dask", tasks.add, 1, 2) == 3


async def test_killed_worker_fails_the_run_with_a_transport_error(process_cluster: Any, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    async with _runtime(process_cluster.scheduler_address) as runtime:
        call = asyncio.ensure_future(runtime.call("dask", _pid_then_sleep(str(pid_file))))
        pid = int(await _wait_for_file(pid_file, 30))
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(EnvironmentExecutionError, match="KilledWorker") as info:
            await asyncio.wait_for(call, 30)
        assert info.value.payload["source"] == "transport"


async def test_killed_worker_with_requeue_is_delivered_again(process_cluster: Any, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    async with _runtime(process_cluster.scheduler_address) as runtime:
        call = asyncio.ensure_future(runtime.call_with(
            "dask", _pid_then_sleep(str(pid_file)), (), delivery_orphan_policy="requeue"
        ))
        pid = int(await _wait_for_file(pid_file, 30))
        os.kill(pid, signal.SIGKILL)
        result = await asyncio.wait_for(call, 45)
        assert result.startswith("re-delivered to ") and result != f"re-delivered to {pid}"


async def test_scheduler_and_worker_started_from_the_cli(cli_cluster: dict[str, Any]) -> None:
    async with _runtime(cli_cluster["address"]) as runtime:
        assert await asyncio.wait_for(runtime.call("dask", tasks.add, 40, 2), 30) == 42
        worker_pid = await runtime.call("dask", tasks.pid)
        assert worker_pid not in (os.getpid(), cli_cluster["scheduler"].pid)
        with pytest.raises(tasks.ContractTaskError):
            await runtime.call("dask", tasks.fail, "cli")


def test_dask_keys_group_runs_by_task() -> None:
    from dask.utils import key_split

    from wove_executor_dask.adapter import dask_key

    keys = [dask_key("add", f"add:0f3a9c1b2d4e5f6a{i:x}") for i in range(1, 40)]
    assert keys[0] == "add-add:0f3a9c1b2d4e5f6a1" and len(set(keys)) == len(keys)
    assert {key_split(key) for key in keys} == {"add"}  # one Dask task group, as with Dask's own keys
    assert dask_key("add", "add:1", attempt=2) == "add-add:1#2" and key_split("add-add:1#2") == "add"


async def test_runs_share_one_task_group_on_the_scheduler(process_cluster: Any) -> None:
    from wove_executor_dask import build_dask_executor

    executor = build_dask_executor()
    definition = {"executor": executor, "executor_config": {"address": process_cluster.scheduler_address}}
    async with ExecutorRuntime({"dask": definition}, {}) as runtime:
        assert await asyncio.gather(*(runtime.call("dask", tasks.add, i, 1) for i in range(20))) == [
            i + 1 for i in range(20)
        ]
        assert executor.adapter is not None
        client = executor.adapter.client  # type: ignore[attr-defined]
        groups = await client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    assert "add" in groups and not any(name.startswith("add:") for name in groups)


@pytest.mark.parametrize("policy", ["requeue", "fail"])
async def test_scheduler_death_ends_pending_runs_with_a_transport_error(
    cli_cluster: dict[str, Any], tmp_path: Path, policy: str
) -> None:
    """The client gives up reconnecting: every pending run (re-delivered ones too) ends, naming the scheduler.

    One run sleeps on the worker; another asks for a resource no worker has, so it is never
    scheduled and no worker will ever answer for it: only the executor can end it.
    """
    from wove_executor_dask import build_dask_executor

    address = cli_cluster["address"]
    pid_file = tmp_path / "pid"
    config = {"address": address, "connect_timeout": 1.0}
    never = build_dask_executor()
    environments = {
        "dask": {"executor": "dask", "executor_config": config},
        "never": {"executor": never, "executor_config": {**config,
                                                         "submit_options": {"resources": {"no-such-thing": 1}}}},
    }
    async with ExecutorRuntime(environments, {}) as runtime:
        running = asyncio.ensure_future(runtime.call_with(
            "dask", _pid_then_sleep(str(pid_file)), (), delivery_orphan_policy=policy
        ))
        stranded = asyncio.ensure_future(runtime.call_with("never", tasks.add, (1, 2), delivery_orphan_policy=policy))
        await _wait_for_file(pid_file, 30)
        assert never.adapter is not None
        client = never.adapter.client  # type: ignore[attr-defined]
        while await client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)) < 2:
            await asyncio.sleep(0.05)
        os.killpg(cli_cluster["scheduler"].pid, signal.SIGKILL)
        for call in (running, stranded):
            with pytest.raises(EnvironmentExecutionError) as info:
                await asyncio.wait_for(call, 30)
            assert info.value.payload["source"] == "transport"
        message = str(info.value)  # the never-scheduled run
        assert address in message and "scheduler" in message
        if policy == "requeue":  # re-delivered while the client reconnected, then ended when it gave up
            assert "gave up reconnecting" in message
        # later calls fail at once with the same explanation instead of hanging
        with pytest.raises(EnvironmentExecutionError, match="gave up reconnecting") as later:
            await asyncio.wait_for(runtime.call("never", tasks.add, 1, 2), 30)
        assert address in str(later.value)
