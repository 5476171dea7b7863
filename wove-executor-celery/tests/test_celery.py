"""End to end on real ``celery worker`` processes: Redis (broker and results) and RabbitMQ (rpc results)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
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


def _executions(log: Path) -> int:
    return len(log.read_text().split()) if log.exists() else 0


async def test_idempotency_key_is_the_celery_task_id_and_runs_once(redis_worker: Any, tmp_path: Path) -> None:
    """Two runs with one key at once share one Celery task; a later submission with the key,
    from another runtime, gets the stored outcome without running it again."""
    from celery import Celery

    log = tmp_path / "executions"
    key = f"report-{uuid.uuid4().hex}"
    async with _runtime(redis_worker) as runtime:
        first = await asyncio.gather(*(
            runtime.call_with("celery", tasks.record, (str(log), 0.5), delivery_idempotency_key=key) for _ in range(2)))
    assert first == [str(log), str(log)] and _executions(log) == 1
    async with _runtime(redis_worker) as runtime:
        again = await runtime.call_with("celery", tasks.record, (str(log),), delivery_idempotency_key=key)
        other = await runtime.call_with("celery", tasks.record, (str(log),), delivery_idempotency_key=f"{key}-other")
    assert again == other == str(log)
    assert _executions(log) == 2  # the same key ran once, the other key once
    # a third executor submits a key whose task is running on a worker now: it waits for that task
    running = f"{key}-running"
    async with _runtime(redis_worker) as first, _runtime(redis_worker) as second:
        started = asyncio.ensure_future(
            first.call_with("celery", tasks.record, (str(log), 1.5), delivery_idempotency_key=running))
        while not await _celery_state_is(redis_worker, running, "STARTED"):
            await asyncio.sleep(0.05)
        joined = await second.call_with("celery", tasks.record, (str(log),), delivery_idempotency_key=running)
        assert joined == await started == str(log)
    assert _executions(log) == 3
    service = redis_worker.service
    app = Celery("check", broker=service.broker_url, backend=service.result_backend, set_as_current=False)
    app.conf.update(service.settings)
    try:
        assert app.AsyncResult(key).state == "SUCCESS"  # Celery knows the task by the key
    finally:
        app.close()


async def _celery_state_is(worker: Any, task_id: str, state: str) -> bool:
    from celery import Celery

    service = worker.service
    app = Celery("check", broker=service.broker_url, backend=service.result_backend, set_as_current=False)
    app.conf.update(service.settings)
    try:
        return await asyncio.to_thread(lambda: app.AsyncResult(task_id).state == state)
    finally:
        app.close()


async def test_idempotency_key_shares_one_task_within_an_executor_on_rabbitmq(rabbit_worker: Any,
                                                                              tmp_path: Path) -> None:
    log = tmp_path / "executions"
    key = f"nightly-{uuid.uuid4().hex}"
    async with _runtime(rabbit_worker) as runtime:
        results = await asyncio.gather(*(
            runtime.call_with("celery", tasks.record, (str(log), 0.5), delivery_idempotency_key=key) for _ in range(3)))
    assert results == [str(log)] * 3 and _executions(log) == 1
    assert f"wove.run_backend_payload[{key}] received" in rabbit_worker.output


@pytest.mark.timeout(120)
async def test_many_tasks_with_a_bounded_number_in_flight(worker: Any) -> None:
    definition = {"executor": "celery", "executor_config": worker.executor_config(), "delivery_max_in_flight": 256}
    async with ExecutorRuntime({"celery": definition}, {}) as runtime:
        results = await asyncio.wait_for(
            asyncio.gather(*(runtime.call("celery", tasks.add, i, 1) for i in range(2000))), 100)
    assert results == [i + 1 for i in range(2000)]


async def test_forged_callbacks_are_refused_and_the_real_outcome_accepted(redis_worker: Any) -> None:
    import httpx

    from wove.backend import CALLBACK_RUN_HEADER, CALLBACK_SIGNATURE_HEADER, callback_headers
    from wove.protocol import encode_event
    from wove_executor_celery import build_celery_executor

    executor = build_celery_executor()
    definition = {"executor": executor, "executor_config": redis_worker.executor_config()}
    async with ExecutorRuntime({"celery": definition}, {}) as runtime:
        future = runtime.submit("celery", tasks.sleep, 1.5)
        await asyncio.sleep(0.3)
        assert executor.adapter is not None
        url = executor.adapter.callback_url
        body = encode_event({"type": "task_result", "run_id": future.run_id, "task_id": "sleep", "result": "forged"})
        async with httpx.AsyncClient() as client:
            unsigned = await client.post(url, content=body, headers={"Content-Type": "application/json"})
            wrong = await client.post(url, content=body, headers={
                "Content-Type": "application/json", **callback_headers("not-the-run-key", future.run_id, body)})
            half = await client.post(url, content=body, headers={CALLBACK_RUN_HEADER: future.run_id})
        assert unsigned.status_code == 403, unsigned.text
        assert wrong.status_code in (401, 403), wrong.text
        assert half.status_code == 400 and CALLBACK_SIGNATURE_HEADER in half.text
        assert await asyncio.wait_for(future, 30) == "slept"  # the worker's signed callback


async def test_workers_that_do_not_know_the_task_name_fail_the_run_clearly(redis_worker: Any) -> None:
    async with _runtime(redis_worker, task_name="wove.no_such_task") as runtime:
        with pytest.raises(EnvironmentExecutionError) as info:
            await asyncio.wait_for(runtime.call("celery", tasks.add, 1, 2), 30)
    message = str(info.value)
    assert "wove.no_such_task" in message and "celery -A wove_executor_celery.worker" in message, message
    assert info.value.payload["source"] == "transport"


def _record_pid_and_sleep(log: str, seconds: float) -> Any:
    """A sync task (a closure) that appends its pid to ``log`` and sleeps ``seconds``, every time."""

    def record_pid_and_sleep() -> int:
        import os
        import time

        with open(log, "a") as file:
            file.write(f"{os.getpid()}\n")
        time.sleep(seconds)
        return os.getpid()

    return record_pid_and_sleep


async def test_requeue_after_killed_pool_processes_is_bounded_by_max_deliveries(redis_worker: Any,
                                                                                tmp_path: Path) -> None:
    log = tmp_path / "executions"
    async with _runtime(redis_worker, max_deliveries=2, reconnect_initial_delay=0.05) as runtime:
        call = asyncio.ensure_future(runtime.call_with(
            "celery", _record_pid_and_sleep(str(log), 30), (), delivery_orphan_policy="requeue"))
        for delivery in (1, 2):
            while _executions(log) < delivery:
                assert not call.done(), call
                await asyncio.sleep(0.05)
            os.kill(int(log.read_text().split()[delivery - 1]), signal.SIGKILL)
        with pytest.raises(EnvironmentExecutionError, match="Gave up after 2 deliveries") as info:
            await asyncio.wait_for(call, 30)
    assert "WorkerLostError" in str(info.value) and _executions(log) == 2


async def test_a_whole_worker_killed_mid_task_is_redelivered_by_the_broker_and_the_policy_applies(
        rabbit_redis_celery: Any, celery_worker_factory: Any, tmp_path: Path) -> None:
    """SIGKILL of the whole worker (its main process too): nothing reports the tasks failed, but
    RabbitMQ delivers the unacknowledged messages (``acks_late``) again to the next worker, which
    sees from the stored state that the runs had started and applies each run's orphan policy:
    ``requeue`` runs once more, the default ends with a transport error."""
    logs = {policy: tmp_path / f"{policy}-executions" for policy in ("fail", "requeue")}
    first = celery_worker_factory(rabbit_redis_celery, concurrency=2)
    second = None
    try:
        config = first.executor_config()
        async with ExecutorRuntime({"celery": {"executor": "celery", "executor_config": config}}, {}) as runtime:
            calls = {policy: asyncio.ensure_future(runtime.call_with(
                "celery", _record_pid_then_sleep(str(log), 30), (), delivery_orphan_policy=policy))
                for policy, log in logs.items()}
            for log in logs.values():
                await _wait_for_file(log, 30)
            os.killpg(first.proc.pid, signal.SIGKILL)
            first.proc.wait(timeout=10)
            await asyncio.sleep(0.5)
            assert not any(call.done() for call in calls.values())
            second = await asyncio.get_running_loop().run_in_executor(
                None, lambda: celery_worker_factory(rabbit_redis_celery, concurrency=2, queue_name=first.queue))
            assert await asyncio.wait_for(calls["requeue"], 30) == int(logs["requeue"].read_text().split()[1])
            with pytest.raises(EnvironmentExecutionError, match="broker delivered the task again") as info:
                await asyncio.wait_for(calls["fail"], 30)
        assert info.value.payload["source"] == "transport"
        assert _executions(logs["requeue"]) == 2 and _executions(logs["fail"]) == 1
    finally:
        first.stop()
        if second is not None:
            second.stop()


async def test_a_threads_pool_worker(redis_celery: Any, celery_worker_factory: Any, tmp_path: Path) -> None:
    """The threads pool: sync callables on Celery's pool threads, async ones on the process's
    loop, and a cancel stops a running async task."""
    worker = celery_worker_factory(redis_celery, pool="threads", concurrency=8)
    marker = tmp_path / "marker"
    try:
        async with _runtime(worker) as runtime:
            pids = set(await asyncio.gather(*(runtime.call("celery", tasks.pid) for _ in range(8))))
            assert pids == {worker.proc.pid}  # one process, several threads
            assert await asyncio.gather(*(runtime.call("celery", tasks.blocking_sleep, 0.3) for _ in range(8))) == [
                0.3] * 8
            with pytest.raises(DeliveryTimeoutError):
                await runtime.call_with("celery", tasks.sleep, (1.5, str(marker)), delivery_timeout=0.5)
            await asyncio.sleep(1.5)
            assert not marker.exists(), "the cancelled async task ran to its end"
    finally:
        worker.stop()
