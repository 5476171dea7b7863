"""End to end on a real ``rq worker``: results, errors, stop-job, killed horses and workers,
idempotency keys as RQ job ids, the RQ result channel, many runs in flight."""

from __future__ import annotations

import asyncio
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
    base = {"redis_url": worker.url, "queue_name": worker.queue}
    return ExecutorRuntime({"rq": {"executor": "rq", "executor_config": {**base, **config}}}, {})


def _job(worker: Any, job_id: str) -> Any:
    from redis import Redis
    from rq.job import Job

    return Job.fetch(job_id, connection=Redis.from_url(worker.url))


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


async def test_sync_and_async_tasks_and_the_tasks_own_exception(rq_worker: Any) -> None:
    async with _runtime(rq_worker) as runtime:
        assert await runtime.call("rq", tasks.add, 2, 3) == 5  # sync
        assert await runtime.call("rq", tasks.echo, {"k": [1, b"x"]}) == {"k": [1, b"x"]}  # async
        worker_pid = await runtime.call("rq", tasks.pid)
        assert worker_pid not in (os.getpid(), rq_worker.pid)  # a forked work horse
        with pytest.raises(ValueError, match="helper broke") as info:
            await runtime.call("rq", tasks.fail_in_helper, "helper broke")
        assert isinstance(info.value.__cause__, RemoteTraceback)
        assert "failing_helper" in str(info.value.__cause__)


async def test_a_given_rq_queue_is_used(rq_worker: Any) -> None:
    """Wove 2.x's ``queue`` key: an ``rq.Queue`` object instead of redis_url/queue_name."""
    from redis import Redis
    from rq import Queue

    connection = Redis.from_url(rq_worker.url)
    queue = Queue(rq_worker.queue, connection=connection)
    environments = {"rq": {"executor": "rq", "executor_config": {"queue": queue}}}
    try:
        async with ExecutorRuntime(environments, {}) as runtime:
            assert await runtime.call("rq", tasks.add, 40, 2) == 42
    finally:
        connection.close()


async def test_delivery_timeout_stops_the_rq_job(rq_worker: Any, tmp_path: Path) -> None:
    marker = tmp_path / "finished"
    key = f"timeout-{uuid.uuid4().hex}"
    async with _runtime(rq_worker) as runtime:
        with pytest.raises(DeliveryTimeoutError):
            await runtime.call_with("rq", tasks.sleep, (5.0, str(marker)), delivery_timeout=1.0,
                                    delivery_idempotency_key=key)
        deadline = time.monotonic() + 15
        while (status := _job(rq_worker, key).get_status()) != "stopped":
            assert time.monotonic() < deadline, f"RQ job {key} is {status!r}, not stopped"
            await asyncio.sleep(0.1)
        assert await runtime.call("rq", tasks.add, 1, 1) == 2  # the worker took the next job
    await asyncio.sleep(4.5)
    assert not marker.exists(), "the stopped job ran to completion"


async def test_a_killed_work_horse_ends_the_run_with_a_transport_error(rq_worker: Any, tmp_path: Path) -> None:
    marker = tmp_path / "executions"
    async with _runtime(rq_worker) as runtime:
        call = asyncio.ensure_future(runtime.call("rq", _counting_task(str(marker)), 1))
        (pid,) = await _wait_for_lines(marker, 1)
        os.kill(int(pid), signal.SIGKILL)
        with pytest.raises(EnvironmentExecutionError) as info:
            await asyncio.wait_for(call, 20)
        assert info.value.payload["source"] == "transport"
        message = str(info.value)
        assert "RQ job" in message and rq_worker.queue in message and "Work-horse terminated" in message
        assert await runtime.call("rq", tasks.add, 2, 2) == 4
    assert len(marker.read_text().splitlines()) == 1


async def test_a_killed_work_horse_with_requeue_runs_exactly_once_more(rq_worker: Any, tmp_path: Path) -> None:
    marker = tmp_path / "executions"
    async with _runtime(rq_worker) as runtime:
        call = asyncio.ensure_future(runtime.call_with("rq", _counting_task(str(marker)), (7,),
                                                       delivery_orphan_policy="requeue"))
        (pid,) = await _wait_for_lines(marker, 1)
        os.kill(int(pid), signal.SIGKILL)
        assert await asyncio.wait_for(call, 30) == "execution 2 of 7"
    await asyncio.sleep(0.5)
    assert len(marker.read_text().splitlines()) == 2


async def test_repeated_idempotency_key_runs_once_as_that_rq_job(rq_worker: Any, tmp_path: Path) -> None:
    marker = tmp_path / "executions"
    key = f"report-{uuid.uuid4().hex[:8]}"
    task = _counting_task(str(marker), sleep_first=0.5)
    async with _runtime(rq_worker) as runtime:
        first, second = await asyncio.gather(
            runtime.call_with("rq", task, (1,), delivery_idempotency_key=key),
            runtime.call_with("rq", task, (1,), delivery_idempotency_key=key),
        )
        assert first == second == "execution 1 of 1"
    async with _runtime(rq_worker) as runtime:  # another caller, later: RQ still has the job
        assert await runtime.call_with("rq", task, (1,), delivery_idempotency_key=key) == "execution 1 of 1"
    assert len(marker.read_text().splitlines()) == 1
    assert _job(rq_worker, key).get_status() == "finished"  # the key is the RQ job id


async def test_results_come_back_through_rq_when_the_callback_is_unreachable(rq_worker: Any) -> None:
    async with _runtime(rq_worker, callback_url="http://127.0.0.1:9/") as runtime:
        assert await runtime.call("rq", tasks.add, 20, 22) == 42
        assert await runtime.call("rq", tasks.echo, "async") == "async"
        with pytest.raises(ValueError, match="unreachable") as info:
            await runtime.call("rq", tasks.fail_in_helper, "unreachable")
        assert "failing_helper" in str(info.value.__cause__)
        assert await asyncio.gather(*(runtime.call("rq", tasks.add, i, 1) for i in range(20))) == [
            i + 1 for i in range(20)]


async def test_the_wove_2x_job_function_runs_on_these_workers(rq_worker: Any) -> None:
    """``wove.integrations.worker.run``, what Wove 2.x enqueues, still runs (posting callbacks)."""
    async with _runtime(rq_worker, function="wove.integrations.worker.run") as runtime:
        assert await runtime.call("rq", tasks.add, 3, 4) == 7
        with pytest.raises(tasks.ContractTaskError, match=r"2\.x"):
            await runtime.call("rq", tasks.fail, "2.x")


@pytest.mark.timeout(90)
async def test_500_runs_with_64_in_flight(rq_worker: Any) -> None:
    definition = {"executor": "rq", "delivery_max_in_flight": 64,
                  "executor_config": {"redis_url": rq_worker.url, "queue_name": rq_worker.queue}}
    async with ExecutorRuntime({"rq": definition}, {}) as runtime:
        results = await asyncio.gather(*(runtime.call("rq", tasks.add, i, i) for i in range(500)))
    assert results == [2 * i for i in range(500)]


async def test_a_killed_worker_is_noticed_and_requeue_runs_the_job_again(rq_worker: Any, tmp_path: Path) -> None:
    """The whole ``rq worker`` dies (worker and horse): its command channel goes quiet, the
    run is lost within about a second and re-delivered; a restarted worker runs it."""
    marker = tmp_path / "executions"
    try:
        async with _runtime(rq_worker) as runtime:
            call = asyncio.ensure_future(runtime.call_with("rq", _counting_task(str(marker)), (3,),
                                                           delivery_orphan_policy="requeue"))
            (pid,) = await _wait_for_lines(marker, 1)
            rq_worker.kill()
            os.kill(int(pid), signal.SIGKILL)
            await asyncio.sleep(3)  # lost and re-enqueued by now; no worker runs it yet
            assert not call.done()
            rq_worker.start()
            assert await asyncio.wait_for(call, 30) == "execution 2 of 3"
    finally:
        if rq_worker.proc is None or rq_worker.proc.poll() is not None:
            rq_worker.start()
    assert len(marker.read_text().splitlines()) == 2
