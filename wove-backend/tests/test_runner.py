"""The worker-side payload runner: a payload runs in the one WorkerEngine and posts its events."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from pathlib import Path
from typing import Any

import pytest

from wove.protocol import TERMINAL_EVENTS
from wove.testing import tasks
from wove_backend import (
    BackendCallbackServer,
    build_backend_payload,
    execute_backend_payload,
    run_backend_payload,
    run_backend_payload_async,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def server() -> Any:
    srv = BackendCallbackServer()
    await srv.start()
    yield srv
    await srv.stop()


def _payload(server: BackendCallbackServer, func: Any, args: dict[str, Any], run_id: str = "r:1",
             **delivery: Any) -> dict[str, Any]:
    assert server.callback_url is not None
    frame = {"type": "run_task", "run_id": run_id, "task_id": run_id.split(":")[0], "callable": func,
             "args": args, "delivery": delivery}
    return build_backend_payload(frame, callback_url=server.callback_url, adapter="test")


async def _until_terminal(server: BackendCallbackServer) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    while not events or events[-1]["type"] not in TERMINAL_EVENTS:
        events.append(await asyncio.wait_for(server.recv(), 10))
    return events


def test_wove_backend_is_wove_backend_under_its_seed_name() -> None:
    import wove.backend
    import wove_backend
    from wove.environment import BackendAdapterEnvironmentExecutor

    assert wove.backend.__all__ == wove_backend.__all__
    for name in wove_backend.__all__:
        assert getattr(wove.backend, name) is getattr(wove_backend, name), name
    assert BackendAdapterEnvironmentExecutor is wove_backend.BackendAdapterEnvironmentExecutor


async def test_an_undecodable_payload_posts_an_executor_error(server: BackendCallbackServer) -> None:
    payload = {**_payload(server, tasks.add, {"a": 1, "b": 2}), "callable_pickle": "bm90IGEgcGlja2xl"}
    outcome = await run_backend_payload_async(payload)
    assert outcome["type"] == "task_error" and outcome["error"]["source"] == "executor"
    assert "r:1" in outcome["error"]["message"]
    (event,) = await _until_terminal(server)
    assert event["type"] == "task_error" and event["error"]["kind"] == "ProtocolError"


async def test_a_task_raising_system_exit_is_its_error_not_the_workers(server: BackendCallbackServer) -> None:
    def leave() -> None:
        raise SystemExit(3)

    outcome = await asyncio.to_thread(run_backend_payload, _payload(server, leave, {}))
    assert outcome["type"] == "task_error" and outcome["error"]["kind"] == "SystemExit"
    events = await _until_terminal(server)
    assert events[-1]["type"] == "task_error" and events[-1]["error"]["source"] == "task"


async def test_cancel_event_cancels_the_run_and_posts_task_cancelled(
    server: BackendCallbackServer, tmp_path: Path
) -> None:
    marker = tmp_path / "marker"
    cancel = asyncio.Event()
    payload = _payload(server, tasks.sleep, {"seconds": 5, "marker": str(marker)})
    running = asyncio.ensure_future(execute_backend_payload(payload, cancel_event=cancel))
    assert (await asyncio.wait_for(server.recv(), 10))["type"] == "task_started"
    cancel.set()
    event, posted = await asyncio.wait_for(running, 10)
    assert event["type"] == "task_cancelled" and posted is True
    assert (await asyncio.wait_for(server.recv(), 10))["type"] == "task_cancelled"
    assert not marker.exists()


async def test_sync_callables_run_in_the_given_executor(server: BackendCallbackServer) -> None:
    def thread_name() -> str:
        return threading.current_thread().name

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="engine-worker") as pool:
        event, posted = await execute_backend_payload(_payload(server, thread_name, {}), executor=pool)
    assert posted is True and event["type"] == "task_result"
    assert event["result"].startswith("engine-worker")
    assert (await _until_terminal(server))[-1]["result"] == event["result"]


async def test_a_stopped_worker_posts_a_retryable_transport_error(server: BackendCallbackServer) -> None:
    running = asyncio.ensure_future(execute_backend_payload(_payload(server, tasks.sleep, {"seconds": 5})))
    assert (await asyncio.wait_for(server.recv(), 10))["type"] == "task_started"
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    event = await asyncio.wait_for(server.recv(), 10)
    assert event["type"] == "task_error"
    assert event["error"]["kind"] == "WorkerStopped" and event["error"]["source"] == "transport"
    assert event["error"]["retryable"] is True


async def test_heartbeats_come_from_the_engine_while_a_sync_task_blocks(server: BackendCallbackServer) -> None:
    payload = _payload(server, tasks.blocking_sleep, {"seconds": 0.6}, delivery_heartbeat_seconds=0.3)
    assert await asyncio.to_thread(run_backend_payload, payload) == 0.6
    kinds = [e["type"] for e in await _until_terminal(server)]
    assert kinds[0] == "task_started" and kinds[-1] == "task_result" and kinds.count("heartbeat") >= 2
