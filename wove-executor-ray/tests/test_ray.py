"""Delivery semantics on a real Ray head: cancel, killed workers, idempotency keys, many runs,
results through the ObjectRef, forged callbacks."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from wove.environment import DeliveryTimeoutError, EnvironmentExecutionError, ExecutorRuntime
from wove.testing import tasks
from wove_executor_ray import build_ray_executor

pytestmark = [pytest.mark.timeout(150), pytest.mark.integration]


def _runtime(address: str, **config: Any) -> ExecutorRuntime:
    return ExecutorRuntime({"ray": {"executor": "ray", "executor_config": {"address": address, **config}}}, {})


async def _wait_for_file(path: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"{path} not written within {timeout}s"
        await asyncio.sleep(0.05)
    return path.read_text()


def _executions(counter: Path) -> int:
    return len(counter.read_text().splitlines()) if counter.exists() else 0


def _sync_sleep_then_mark(started: str, marker: str, seconds: float) -> Any:
    """A sync task (a closure: pickled by value, the workers cannot import this module)."""

    def sleep_then_mark() -> str:
        import time
        from pathlib import Path

        Path(started).write_text("started")
        time.sleep(seconds)
        Path(marker).write_text("finished")
        return "finished"

    return sleep_then_mark


def _counted(counter: str, pid_dir: str, *, sleep_from: int, sleep_until: int) -> Any:
    """A sync task that counts its executions; executions number ``sleep_from`` to
    ``sleep_until - 1`` write their pid to ``pid_dir/<n>`` and sleep (to be killed)."""

    def counted() -> str:
        import os
        import time
        from pathlib import Path

        path = Path(counter)
        n = len(path.read_text().splitlines()) if path.exists() else 0
        with path.open("a") as file:
            file.write(f"{os.getpid()}\n")
        if sleep_from <= n < sleep_until:
            (Path(pid_dir) / str(n)).write_text(str(os.getpid()))
            time.sleep(60)
            return "not killed"
        return f"execution {n} in {os.getpid()}"

    return counted


# -- tasks in Ray worker processes -------------------------------------------------------
async def test_sync_and_async_tasks_run_in_ray_worker_processes(ray_connected: str) -> None:
    async with _runtime(ray_connected) as runtime:
        worker_pid = await runtime.call("ray", tasks.pid)
        assert worker_pid != os.getpid()
        assert await runtime.call("ray", tasks.add, 40, 2) == 42  # sync
        assert await runtime.call("ray", tasks.echo, {"x": [1, 2]}) == {"x": [1, 2]}  # async
        assert await runtime.call("ray", tasks.sleep, 0.1) == "slept"
        with pytest.raises(tasks.ContractTaskError, match="from a Ray worker"):
            await runtime.call("ray", tasks.fail, "from a Ray worker")


# -- cancellation --------------------------------------------------------------------------
def _async_sleep_then_mark(started: str, marker: str, seconds: float) -> Any:
    async def sleep_then_mark() -> str:
        import asyncio
        from pathlib import Path

        Path(started).write_text("started")
        await asyncio.sleep(seconds)
        Path(marker).write_text("finished")
        return "finished"

    return sleep_then_mark


async def test_delivery_timeout_cancels_a_running_async_task_on_the_worker(ray_connected: str,
                                                                           tmp_path: Path) -> None:
    started, marker = tmp_path / "started", tmp_path / "finished"
    async with _runtime(ray_connected) as runtime:
        call = asyncio.ensure_future(runtime.call_with(
            "ray", _async_sleep_then_mark(str(started), str(marker), 2.0), (), delivery_timeout=8.0))
        await _wait_for_file(started, 30)  # running on the worker: ray.cancel has to interrupt it
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        with pytest.raises(DeliveryTimeoutError):
            await runtime.call_with("ray", tasks.sleep, (3.0, str(marker)), delivery_timeout=0.5)
        await asyncio.sleep(3.0)
        assert not marker.exists(), "a cancelled async task ran to completion on the Ray worker"
        assert await runtime.call("ray", tasks.add, 1, 2) == 3


@pytest.mark.parametrize("force_cancel", [False, True])
async def test_force_cancel_really_stops_a_sync_task(ray_connected: str, tmp_path: Path, force_cancel: bool) -> None:
    """A sync task cannot be interrupted in its thread: ray.cancel abandons it (it runs on and
    finishes), ray.cancel(force=True) kills the worker process running it."""
    started, marker = tmp_path / "started", tmp_path / "finished"
    async with _runtime(ray_connected, force_cancel=force_cancel) as runtime:
        call = asyncio.ensure_future(runtime.call_with("ray", _sync_sleep_then_mark(str(started), str(marker), 1.5),
                                                       (), delivery_timeout=8.0))
        await _wait_for_file(started, 30)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await asyncio.sleep(2.5)
        assert marker.exists() is (not force_cancel)
        assert await runtime.call("ray", tasks.add, 1, 2) == 3  # the cluster runs the next task


# -- a Ray worker killed mid-task ----------------------------------------------------------
async def test_killed_worker_fails_the_run_naming_ray(ray_connected: str, tmp_path: Path) -> None:
    counter, pids = tmp_path / "counter", tmp_path
    async with _runtime(ray_connected) as runtime:
        call = asyncio.ensure_future(runtime.call("ray", _counted(str(counter), str(pids), sleep_from=0,
                                                                  sleep_until=99)))
        pid = int(await _wait_for_file(pids / "0", 30))
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(EnvironmentExecutionError) as info:
            await asyncio.wait_for(call, 30)
    message = str(info.value)
    assert info.value.payload["source"] == "transport"
    assert "Ray task" in message and "WorkerCrashedError" in message and "died or was killed" in message
    assert "delivery_orphan_policy" in message
    assert _executions(counter) == 1  # Ray did not re-run it behind Wove's back (max_retries=0)


async def test_killed_worker_with_requeue_runs_exactly_once_more(ray_connected: str, tmp_path: Path) -> None:
    counter, pids = tmp_path / "counter", tmp_path
    async with _runtime(ray_connected) as runtime:
        call = asyncio.ensure_future(runtime.call_with(
            "ray", _counted(str(counter), str(pids), sleep_from=0, sleep_until=1), (), delivery_orphan_policy="requeue"))
        pid = int(await _wait_for_file(pids / "0", 30))
        os.kill(pid, signal.SIGKILL)
        result = await asyncio.wait_for(call, 45)
    assert result.startswith("execution 1 in ") and result != f"execution 1 in {pid}"
    assert _executions(counter) == 2


async def test_requeue_is_bounded_by_max_deliveries(ray_connected: str, tmp_path: Path) -> None:
    counter, pids = tmp_path / "counter", tmp_path
    async with _runtime(ray_connected, max_deliveries=2) as runtime:
        call = asyncio.ensure_future(runtime.call_with(
            "ray", _counted(str(counter), str(pids), sleep_from=0, sleep_until=99), (),
            delivery_orphan_policy="requeue"))
        for attempt in range(2):
            os.kill(int(await _wait_for_file(pids / str(attempt), 30)), signal.SIGKILL)
        with pytest.raises(EnvironmentExecutionError, match="Gave up after 2 deliveries") as info:
            await asyncio.wait_for(call, 45)
    assert "WorkerCrashedError" in str(info.value)
    assert _executions(counter) == 2


# -- delivery_idempotency_key ----------------------------------------------------------------
async def test_a_repeated_key_does_not_run_twice(ray_connected: str, tmp_path: Path) -> None:
    counter = tmp_path / "counter"
    key = f"report-{uuid.uuid4().hex}"
    first, second = build_ray_executor(), build_ray_executor()
    config = {"address": ray_connected}
    environments = {"a": {"executor": first, "executor_config": config},
                    "b": {"executor": second, "executor_config": config}}
    async with ExecutorRuntime(environments, {}) as runtime:
        # the first keyed run on a cluster starts the ledger actor (a Ray worker process),
        # which may take longer than the heartbeat window of the runs below
        await runtime.call_with("a", tasks.add, (1, 1), delivery_idempotency_key=key + "-warm-up")
        # concurrently, from two executors (a duplicate gets liveness while the shared task runs)
        results = await asyncio.gather(
            runtime.call_with("a", tasks.record, (str(counter), 2.5), delivery_idempotency_key=key,
                              delivery_heartbeat_seconds=1.5),
            runtime.call_with("b", tasks.record, (str(counter), 2.5), delivery_idempotency_key=key,
                              delivery_heartbeat_seconds=1.5),
        )
        assert results == [str(counter), str(counter)]
        # later, with the outcome kept
        assert await runtime.call_with("a", tasks.record, (str(counter),), delivery_idempotency_key=key) == str(counter)
        assert _executions(counter) == 1
        # another key runs
        await runtime.call_with("b", tasks.record, (str(counter),), delivery_idempotency_key=key + "-other")
        assert _executions(counter) == 2
    async with _runtime(ray_connected) as runtime:  # another runtime, same cluster: still deduplicated
        await runtime.call_with("ray", tasks.record, (str(counter),), delivery_idempotency_key=key)
    assert _executions(counter) == 2


async def test_a_keyed_run_whose_worker_died_runs_again_on_requeue(ray_connected: str, tmp_path: Path) -> None:
    counter, pids = tmp_path / "counter", tmp_path
    key = f"job-{uuid.uuid4().hex}"
    async with _runtime(ray_connected) as runtime:
        call = asyncio.ensure_future(runtime.call_with(
            "ray", _counted(str(counter), str(pids), sleep_from=0, sleep_until=1), (),
            delivery_orphan_policy="requeue", delivery_idempotency_key=key))
        os.kill(int(await _wait_for_file(pids / "0", 30)), signal.SIGKILL)
        assert (await asyncio.wait_for(call, 45)).startswith("execution 1 in ")
        # and the key now names the re-delivered run's outcome
        again = await runtime.call_with("ray", _counted(str(counter), str(pids), sleep_from=0, sleep_until=1), (),
                                        delivery_idempotency_key=key)
        assert again.startswith("execution 1 in ")
    assert _executions(counter) == 2


# -- many runs, bounded in flight ----------------------------------------------------------
async def test_2000_runs_with_256_in_flight(ray_connected: str) -> None:
    definition = {"executor": "ray", "executor_config": {"address": ray_connected}, "delivery_max_in_flight": 256}
    async with ExecutorRuntime({"ray": definition}, {}) as runtime:
        results = await asyncio.gather(*(runtime.call("ray", tasks.add, i, 1) for i in range(2000)))
    assert results == [i + 1 for i in range(2000)]


# -- the outcome through the ObjectRef -----------------------------------------------------
async def test_result_and_error_come_back_when_workers_cannot_reach_the_callback(ray_connected: str) -> None:
    async with _runtime(ray_connected, callback_url="http://127.0.0.1:9/") as runtime:
        assert await runtime.call("ray", tasks.add, 40, 2) == 42
        assert await runtime.call("ray", tasks.sleep, 0.3) == "slept"
        with pytest.raises(tasks.ContractTaskError, match="through the ObjectRef"):
            await runtime.call("ray", tasks.fail, "through the ObjectRef")
        assert await asyncio.gather(*(runtime.call("ray", tasks.add, i, i) for i in range(20))) == [
            2 * i for i in range(20)]


async def test_result_channel_engine_returns_through_the_objectref(ray_connected: str) -> None:
    async with _runtime(ray_connected, result_channel="engine") as runtime:
        assert await runtime.call("ray", tasks.add, 2, 3) == 5
        with pytest.raises(tasks.ContractTaskError, match="engine"):
            await runtime.call("ray", tasks.fail, "engine")


# -- signed callbacks --------------------------------------------------------------------------
def _post(url: str, body: bytes, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


async def test_a_forged_callback_is_refused_and_the_real_one_accepted(ray_connected: str) -> None:
    from wove.backend import callback_headers, new_callback_key
    from wove.protocol import encode_event

    executor = build_ray_executor()
    definition = {"executor": executor, "executor_config": {"address": ray_connected}}
    async with ExecutorRuntime({"ray": definition}, {}) as runtime:
        future = runtime.submit("ray", tasks.sleep, 1.5)
        await asyncio.sleep(0.3)
        assert executor.adapter is not None
        url = executor.adapter.callback_url
        forged = encode_event({"type": "task_result", "run_id": future.run_id, "task_id": "sleep",
                               "result": "forged"})
        unsigned = await asyncio.to_thread(_post, url, forged, {})
        wrong_key = await asyncio.to_thread(_post, url, forged,
                                            callback_headers(new_callback_key(), future.run_id, forged))
        assert unsigned in (401, 403) and wrong_key in (401, 403)
        assert await asyncio.wait_for(future, 30) == "slept"
