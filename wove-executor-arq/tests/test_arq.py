"""End to end on a real arq worker: results, errors, abort, killed workers, idempotency keys as
arq job ids, the arq result channel, many runs in flight."""

from __future__ import annotations

import asyncio
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
    base = {"redis_settings": worker.url, "queue_name": worker.queue}
    return ExecutorRuntime({"arq": {"executor": "arq", "executor_config": {**base, **config}}}, {})


async def _job(worker: Any, job_id: str) -> Any:
    """``(status, result_info)`` of arq job ``job_id``."""
    from arq.connections import RedisSettings, create_pool
    from arq.jobs import Job

    pool = await create_pool(RedisSettings.from_dsn(worker.url))
    try:
        job = Job(job_id, pool, _queue_name=worker.queue)
        return await job.status(), await job.result_info()
    finally:
        await pool.aclose()


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


async def test_sync_and_async_tasks_and_the_tasks_own_exception(arq_worker: Any) -> None:
    async with _runtime(arq_worker) as runtime:
        assert await runtime.call("arq", tasks.add, 2, 3) == 5  # sync, on the worker's thread pool
        assert await runtime.call("arq", tasks.echo, {"k": [1, b"x"]}) == {"k": [1, b"x"]}  # async, on its loop
        assert await runtime.call("arq", tasks.pid) == arq_worker.pid
        with pytest.raises(ValueError, match="helper broke") as info:
            await runtime.call("arq", tasks.fail_in_helper, "helper broke")
        assert isinstance(info.value.__cause__, RemoteTraceback)
        assert "failing_helper" in str(info.value.__cause__)


async def test_the_wove_2x_pool_and_redis_settings_forms(arq_worker: Any) -> None:
    from arq.connections import RedisSettings, create_pool

    settings = RedisSettings.from_dsn(arq_worker.url)
    pool = await create_pool(settings)
    try:
        for config in ({"pool": pool}, {"redis_settings": settings},
                       {"redis_settings": {"host": settings.host, "port": settings.port,
                                           "database": settings.database}}):
            environments = {"arq": {"executor": "arq",
                                    "executor_config": {**config, "queue_name": arq_worker.queue}}}
            async with ExecutorRuntime(environments, {}) as runtime:
                assert await runtime.call("arq", tasks.add, 40, 2) == 42
        assert await pool.ping()  # a given pool is not closed by Wove
    finally:
        await pool.aclose()


async def test_delivery_timeout_aborts_the_arq_job(arq_worker: Any, tmp_path: Path) -> None:
    marker = tmp_path / "finished"
    key = f"timeout-{uuid.uuid4().hex}"
    async with _runtime(arq_worker) as runtime:
        with pytest.raises(DeliveryTimeoutError):
            await runtime.call_with("arq", tasks.sleep, (5.0, str(marker)), delivery_timeout=1.0,
                                    delivery_idempotency_key=key)
        deadline = time.monotonic() + 10
        while True:
            status, info = await _job(arq_worker, key)
            if info is not None:
                break
            assert time.monotonic() < deadline, f"arq job {key} is still {status} after the timeout"
            await asyncio.sleep(0.1)
        assert not info.success and isinstance(info.result, asyncio.CancelledError)  # aborted by arq
        assert await runtime.call("arq", tasks.add, 1, 1) == 2
    await asyncio.sleep(4.5)
    assert not marker.exists(), "the aborted job ran to completion"


async def test_a_killed_worker_ends_the_run_with_a_transport_error(arq_worker: Any, tmp_path: Path) -> None:
    marker = tmp_path / "executions"
    try:
        async with _runtime(arq_worker) as runtime:
            call = asyncio.ensure_future(runtime.call("arq", _counting_task(str(marker)), 1))
            await _wait_for_lines(marker, 1)
            await asyncio.sleep(0.6)  # the job's liveness key was written and seen
            arq_worker.kill()
            with pytest.raises(EnvironmentExecutionError) as info:
                await asyncio.wait_for(call, 20)
            assert info.value.payload["source"] == "transport"
            message = str(info.value)
            assert "arq job" in message and arq_worker.queue in message and "worker process died" in message
            arq_worker.start()
            await asyncio.sleep(1)  # arq does not run the lost job again by itself
            assert await runtime.call("arq", tasks.add, 2, 2) == 4
    finally:
        if not arq_worker.running:
            arq_worker.start()
    assert len(marker.read_text().splitlines()) == 1


async def test_a_killed_worker_with_requeue_runs_exactly_once_more(arq_worker: Any, tmp_path: Path) -> None:
    marker = tmp_path / "executions"
    try:
        async with _runtime(arq_worker) as runtime:
            call = asyncio.ensure_future(runtime.call_with("arq", _counting_task(str(marker)), (7,),
                                                           delivery_orphan_policy="requeue"))
            await _wait_for_lines(marker, 1)
            await asyncio.sleep(0.6)
            arq_worker.kill()
            await asyncio.sleep(5)  # lost and re-enqueued by now; no worker runs it yet
            assert not call.done()
            arq_worker.start()
            assert await asyncio.wait_for(call, 30) == "execution 2 of 7"
    finally:
        if not arq_worker.running:
            arq_worker.start()
    await asyncio.sleep(0.5)
    assert len(marker.read_text().splitlines()) == 2


async def test_repeated_idempotency_key_runs_once_as_that_arq_job(arq_worker: Any, tmp_path: Path) -> None:
    marker = tmp_path / "executions"
    key = f"report-{uuid.uuid4().hex[:8]}"
    task = _counting_task(str(marker), sleep_first=0.5)
    async with _runtime(arq_worker) as runtime:
        first, second = await asyncio.gather(
            runtime.call_with("arq", task, (1,), delivery_idempotency_key=key),
            runtime.call_with("arq", task, (1,), delivery_idempotency_key=key),
        )
        assert first == second == "execution 1 of 1"
    async with _runtime(arq_worker) as runtime:  # another caller, later: arq still keeps the result
        assert await runtime.call_with("arq", task, (1,), delivery_idempotency_key=key) == "execution 1 of 1"
    assert len(marker.read_text().splitlines()) == 1
    status, info = await _job(arq_worker, key)  # the key is the arq job id
    assert status == "complete" and info.success


async def test_results_come_back_through_arq_when_the_callback_is_unreachable(arq_worker: Any) -> None:
    async with _runtime(arq_worker, callback_url="http://127.0.0.1:9/") as runtime:
        assert await runtime.call("arq", tasks.add, 20, 22) == 42
        assert await runtime.call("arq", tasks.echo, "async") == "async"
        with pytest.raises(ValueError, match="unreachable") as info:
            await runtime.call("arq", tasks.fail_in_helper, "unreachable")
        assert "failing_helper" in str(info.value.__cause__)
        assert await asyncio.gather(*(runtime.call("arq", tasks.add, i, 1) for i in range(20))) == [
            i + 1 for i in range(20)]


async def test_a_worker_without_the_function_names_it(arq_worker: Any) -> None:
    async with _runtime(arq_worker, function_name="no_such_function") as runtime:
        with pytest.raises(EnvironmentExecutionError, match=r"no function 'no_such_function'.*FUNCTIONS"):
            await asyncio.wait_for(runtime.call("arq", tasks.add, 1, 2), 20)


@pytest.mark.timeout(90)
async def test_500_runs_with_64_in_flight(arq_worker: Any) -> None:
    definition = {"executor": "arq", "delivery_max_in_flight": 64,
                  "executor_config": {"redis_settings": arq_worker.url, "queue_name": arq_worker.queue}}
    async with ExecutorRuntime({"arq": definition}, {}) as runtime:
        results = await asyncio.gather(*(runtime.call("arq", tasks.add, i, i) for i in range(500)))
    assert results == [2 * i for i in range(500)]
