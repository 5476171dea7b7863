"""The stdio executor with real worker subprocesses: results, failures, crashes, big frames."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from wove.environment import EnvironmentExecutionError, ExecutorRuntime
from wove.errors import DeliveryTimeoutError, DispatchError
from wove.testing import tasks

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


def runtime(**config: Any) -> ExecutorRuntime:
    return ExecutorRuntime({"w": {"executor": "stdio", "executor_config": config}})


@pytest.fixture
async def rt() -> AsyncIterator[ExecutorRuntime]:
    async with runtime() as started:
        yield started


async def wait_for_file(path: Path, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return path.read_text()
        await asyncio.sleep(0.02)
    raise AssertionError(f"{path} was not written within {timeout}s")


async def test_results_and_task_errors(rt: ExecutorRuntime) -> None:
    assert await rt.call("w", tasks.add, 2, 3) == 5
    assert await rt.call("w", lambda x: {"x": x}, [1, "a"]) == {"x": [1, "a"]}

    class Oops(Exception):
        pass

    def broken() -> None:
        raise Oops("from the worker")

    with pytest.raises(Oops, match="from the worker"):
        await rt.call("w", broken)
    assert await rt.call("w", tasks.add, 1, 1) == 2


async def test_cancellation_reaches_the_worker(rt: ExecutorRuntime, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    call = asyncio.ensure_future(rt.call("w", tasks.sleep, 1.0, str(marker)))
    await asyncio.sleep(0.3)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await asyncio.sleep(1.2)
    assert not marker.exists(), "the cancelled task kept running in the worker"


async def test_heartbeats_keep_a_long_task_alive(rt: ExecutorRuntime) -> None:
    assert await rt.call("w", tasks.add, 0, 0) == 0  # warm: the window starts at send
    # a sync task (in a worker thread) for more than three windows: only heartbeats keep it
    assert await rt.call_with("w", tasks.blocking_sleep, (2.0,), delivery_heartbeat_seconds=0.6) == 2.0


async def test_delivery_timeout_cancels_in_the_worker(rt: ExecutorRuntime) -> None:
    with pytest.raises(DeliveryTimeoutError):
        await rt.call_with("w", tasks.sleep, (5.0,), delivery_timeout=0.3)
    assert await rt.call("w", tasks.add, 1, 2) == 3


def _crash_once(marker: str) -> int:
    if not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        os._exit(7)
    return os.getpid()


async def test_os_exit_in_a_task_fails_that_run_and_the_pool_recovers(rt: ExecutorRuntime, tmp_path: Path) -> None:
    marker = tmp_path / "crashed"
    other = asyncio.ensure_future(rt.call("w", tasks.sleep, 0.1))  # finishes before the crash? either way it ends
    with pytest.raises(EnvironmentExecutionError) as info:
        await rt.call("w", _crash_once, str(marker))
    pid = marker.read_text()
    message = str(info.value)
    assert f"pid {pid}" in message and "exit code 7" in message and "_crash_once" in message
    assert info.value.payload["source"] == "transport"
    await asyncio.gather(other, return_exceptions=True)
    new_pid = await rt.call("w", tasks.pid)
    assert str(new_pid) != pid


async def test_requeue_redelivers_to_the_replacement(tmp_path: Path) -> None:
    marker = tmp_path / "crashed"
    async with runtime() as rt:
        pid = await rt.call_with("w", _crash_once, (str(marker),), delivery_orphan_policy="requeue")
    assert str(pid) != marker.read_text()


async def test_requeue_is_bounded(tmp_path: Path) -> None:
    async with runtime(max_deliveries=2) as rt:
        with pytest.raises(EnvironmentExecutionError, match=r"Gave up after 2 deliveries \(executor_config.max_deliveries=2\)"):
            await rt.call_with("w", os._exit, (3,), delivery_orphan_policy="requeue")
        assert await rt.call("w", tasks.add, 2, 2) == 4


def _pid_then_sleep(path: str) -> str:
    if os.path.exists(path):
        return "second delivery"
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(30)
    return "first delivery"


@pytest.mark.parametrize("policy", ["cancel", "requeue"])
async def test_kill_9_of_the_worker(policy: str, tmp_path: Path) -> None:
    marker = tmp_path / "pid"
    async with runtime() as rt:
        call = asyncio.ensure_future(
            rt.call_with("w", _pid_then_sleep, (str(marker),), delivery_orphan_policy=policy)
        )
        pid = int(await wait_for_file(marker))
        os.kill(pid, signal.SIGKILL)
        if policy == "requeue":
            assert await asyncio.wait_for(call, 20) == "second delivery"
        else:
            with pytest.raises(EnvironmentExecutionError, match=rf"pid {pid}\) .*was killed by SIGKILL"):
                await asyncio.wait_for(call, 20)
        assert await rt.call("w", tasks.add, 5, 5) == 10
        assert await rt.call("w", tasks.pid) != pid  # a new worker took the killed one's place


async def test_20_mib_argument_and_result(rt: ExecutorRuntime) -> None:
    data = os.urandom(20 * MiB)

    def digest(blob: bytes) -> str:
        import hashlib

        return hashlib.sha256(blob).hexdigest()

    assert await rt.call("w", digest, data) == digest(data)
    result = await rt.call("w", lambda n: bytes(range(256)) * (n // 256), 20 * MiB)
    assert result == bytes(range(256)) * (20 * MiB // 256)


def _spin_until_both_run(folder: str) -> tuple[int, bool]:
    """CPU-bound rendezvous: spin until the other task has started too (or give up)."""
    Path(folder, str(os.getpid())).write_text("here")
    deadline = time.monotonic() + 15.0
    spins = 0
    while time.monotonic() < deadline:
        spins += 1
        if spins % 10_000 == 0 and len(os.listdir(folder)) >= 2:
            return os.getpid(), True
    return os.getpid(), False


async def test_pool_of_two_runs_cpu_bound_tasks_in_parallel(tmp_path: Path) -> None:
    async with runtime(processes=2) as rt:
        first, second = await asyncio.gather(
            rt.call("w", _spin_until_both_run, str(tmp_path)),
            rt.call("w", _spin_until_both_run, str(tmp_path)),
        )
    assert first[0] != second[0], "both tasks ran in the same process"
    assert first[1] and second[1], "the two CPU-bound tasks did not run at the same time"


async def test_prints_in_a_task_do_not_break_the_stream(rt: ExecutorRuntime, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="wove_executor_stdio.executor")

    def noisy() -> str:
        import sys

        print('{"type": "task_result", "run_id": "forged:1", "task_id": "x"}')
        print("plain garbage without a newline", end="")
        sys.stdout.write("x" * 100_000 + "\n")
        sys.stdout.flush()
        os.write(1, b"written straight to fd 1\n")
        return "clean"

    assert await rt.call("w", noisy) == "clean"
    assert await rt.call("w", tasks.add, 1, 1) == 2
    await asyncio.sleep(0.2)
    assert "written straight to fd 1" in caplog.text


async def test_unpicklable_argument_fails_only_that_call(rt: ExecutorRuntime) -> None:
    def uses(config: dict[str, Any]) -> int:
        return len(config)

    with pytest.raises(DispatchError, match=r"Task 'uses'.*args\['config'\]\['lock'\].*lock"):
        await rt.call("w", uses, {"lock": threading.Lock(), "n": 1})
    assert await rt.call("w", uses, {"n": 1}) == 1


async def test_stop_leaves_no_process_behind(tmp_path: Path) -> None:
    async with runtime(processes=2) as rt:
        pids = {pid for pid, _ in await asyncio.gather(
            rt.call("w", _spin_until_both_run, str(tmp_path)),
            rt.call("w", _spin_until_both_run, str(tmp_path)),
        )}
        asyncio.ensure_future(rt.call_with("w", tasks.blocking_sleep, (30,), delivery_orphan_policy="detach"))
        await asyncio.sleep(0.3)
    assert len(pids) == 2
    for pid in pids:  # gone and reaped: an unreaped zombie would still answer signal 0
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_env_and_cwd_reach_the_worker(tmp_path: Path) -> None:
    async with runtime(env={"WOVE_STDIO_TEST": "yes"}, cwd=str(tmp_path)) as rt:
        env, cwd = await rt.call("w", lambda: (os.environ.get("WOVE_STDIO_TEST"), os.getcwd()))
    assert env == "yes" and Path(cwd).resolve() == tmp_path.resolve()
