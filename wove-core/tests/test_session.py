"""wove.session: the worker side of the protocol, driven without any transport."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from wove.protocol import decode_events, encode_frame
from wove.session import Rejected, WorkerService, WorkerSession
from wove.testing import tasks


def _command(func: Any, args: dict[str, Any], run_id: str, **delivery: Any) -> bytes:
    return encode_frame({"type": "run_task", "run_id": run_id, "task_id": run_id.split(":")[0],
                         "callable": func, "args": args, "delivery": delivery})


async def _terminal(session: WorkerSession, run_id: str, timeout: float = 10.0) -> dict[str, Any]:
    async def wait() -> dict[str, Any]:
        while True:
            await session.wait()
            for data in session.data_to_send("envelope"):
                for event in decode_events(data):
                    if event["run_id"] == run_id and event["type"] in ("task_result", "task_error", "task_cancelled"):
                        return event

    return await asyncio.wait_for(wait(), timeout)


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


async def test_a_run_goes_through_a_session() -> None:
    service = WorkerService()
    session = service.session("test")
    await session.receive(_command(tasks.add, {"a": 2, "b": 3}, "add:1"))
    event = await _terminal(session, "add:1")
    assert event["type"] == "task_result" and event["result"] == 5
    await service.drain(1.0)


@pytest.mark.parametrize("policy", ["cancel", "fail"])
async def test_disconnect_cancels_cancel_and_fail_runs(policy: str, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    service = WorkerService()
    session = service.session()
    await session.receive(_command(tasks.record, {"path": str(marker), "seconds": 0.3}, "record:1",
                                   delivery_orphan_policy=policy))
    await asyncio.sleep(0.05)
    session.connection_lost()
    await asyncio.sleep(0.5)
    assert _lines(marker) == 0
    assert service.engine.active == 0
    await service.drain(1.0)


@pytest.mark.parametrize(("policy", "key"), [("requeue", None), ("detach", None), ("cancel", "k-1")])
async def test_kept_runs_finish_once_and_a_redelivery_attaches(policy: str, key: str | None, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    service = WorkerService()
    first = service.session("first")
    delivery: dict[str, Any] = {"delivery_orphan_policy": policy}
    if key:
        delivery["delivery_idempotency_key"] = key
    command = _command(tasks.record, {"path": str(marker), "seconds": 0.3}, "record:2", **delivery)
    await first.receive(command)
    await asyncio.sleep(0.05)
    first.connection_lost()
    second = service.session("second")
    await second.receive(command)  # while it still runs
    event = await _terminal(second, "record:2")
    assert event["type"] == "task_result"
    third = service.session("third")
    await third.receive(command)  # after it finished: the kept result
    assert (await _terminal(third, "record:2"))["type"] == "task_result"
    assert _lines(marker) == 1, "the run executed once"
    await service.drain(1.0)


async def test_a_redelivered_run_survives_the_first_connection_closing(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    service = WorkerService()
    first, second = service.session("first"), service.session("second")
    command = _command(tasks.record, {"path": str(marker), "seconds": 0.3}, "record:3")  # policy cancel
    await first.receive(command)
    await second.receive(command)  # the client re-delivered on a new connection
    first.connection_lost()  # the old connection closing must not cancel the new delivery
    assert (await _terminal(second, "record:3"))["type"] == "task_result"
    assert _lines(marker) == 1
    await service.drain(1.0)


async def test_a_shared_service_ignores_a_shutdown_command(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="wove.session")
    service = WorkerService(name="shared")
    session = service.session("client-a")
    await session.receive(b'{"type": "shutdown", "delivery_orphan_policy": "cancel"}')
    await asyncio.sleep(0.05)
    assert not service.closing
    assert "ignored a shutdown command from client-a" in caplog.text
    await session.receive(_command(tasks.add, {"a": 1, "b": 1}, "add:2"))
    assert (await _terminal(session, "add:2"))["result"] == 2
    await service.drain(1.0)


async def test_an_exclusive_worker_obeys_a_shutdown_command() -> None:
    service = WorkerService(exclusive=True, grace=0.5)
    session = service.session()
    await session.receive(_command(tasks.sleep, {"seconds": 5}, "sleep:1", delivery_orphan_policy="cancel"))
    await session.receive(b'{"type": "shutdown"}')
    assert service.closing and session.ended
    events = decode_events(b"".join(session.data_to_send("envelope")))
    assert [e["type"] for e in events if e["run_id"] == "sleep:1"][-1] == "task_cancelled"


async def test_a_slow_reader_pauses_reading() -> None:
    service = WorkerService(max_pending_events=10)
    session = service.session()
    for i in range(12):
        await session.receive(_command(tasks.add, {"a": i, "b": 0}, f"add:{i}"))
    await asyncio.sleep(0.1)
    assert session.reading_paused, "the client read nothing: the session stops taking commands"
    reading = asyncio.ensure_future(session.wait_readable())
    await asyncio.sleep(0.05)
    assert not reading.done()
    results = [e for data in session.data_to_send("list") for e in decode_events(data)]
    await asyncio.wait_for(reading, 1.0)
    assert not session.reading_paused
    assert sorted(e["result"] for e in results if e["type"] == "task_result") == list(range(12))
    await service.drain(1.0)


async def test_too_many_runs_per_session() -> None:
    service = WorkerService(max_runs_per_session=2)
    session = service.session()
    for i in range(3):
        await session.receive(_command(tasks.sleep, {"seconds": 0.2}, f"sleep:{i}"))
    event = await _terminal(session, "sleep:2")
    assert event["type"] == "task_error" and event["error"]["kind"] == "TooManyRuns"
    assert event["error"]["retryable"] is True
    await service.drain(1.0)


async def test_an_oversized_command_is_refused_without_decoding(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    service = WorkerService(max_command_bytes=1000)
    session = service.session()
    command = _command(tasks.record, {"path": str(marker), "padding": "x" * 5000}, "record:9")
    with pytest.raises(Rejected) as info:
        await session.receive(command, strict=True)
    assert info.value.status == 413 and "1000 bytes" in str(info.value)
    await session.receive(command)
    event = await _terminal(session, "record:9")
    assert event["error"]["kind"] == "CommandTooLarge" and "--max-body-bytes" in event["error"]["message"]
    assert not marker.exists()
    await service.drain(1.0)


@pytest.mark.parametrize("data", [b"not json", b"[1, 2]", b'{"type": "launch"}'])
async def test_malformed_input_executes_nothing(data: bytes) -> None:
    service = WorkerService()
    session = service.session()
    with pytest.raises(Rejected) as info:
        await session.receive(data, strict=True)
    assert info.value.status == 400
    await session.receive(data)
    events = [e for chunk in session.data_to_send("list") for e in decode_events(chunk)]
    assert events and all(e["type"] == "log" for e in events)
    assert service.engine.active == 0
    await service.drain(1.0)


async def test_a_bad_pickle_answers_its_run() -> None:
    service = WorkerService()
    session = service.session()
    await session.receive(json.dumps({"type": "run_task", "run_id": "r:1", "task_id": "r",
                                      "callable_pickle": "!!", "args_pickle": ""}).encode())
    event = await _terminal(session, "r:1")
    assert event["type"] == "task_error" and event["error"]["source"] == "executor"
    await service.drain(1.0)


async def test_drain_lets_runs_finish_then_ends_the_rest() -> None:
    service = WorkerService()
    session = service.session()
    await session.receive(_command(tasks.sleep, {"seconds": 0.2}, "sleep:short"))
    await session.receive(_command(tasks.sleep, {"seconds": 30}, "sleep:long"))
    await session.receive(_command(tasks.sleep, {"seconds": 30}, "sleep:requeue", delivery_orphan_policy="requeue"))
    await asyncio.sleep(0.05)
    await service.drain(0.5)
    assert session.ended
    events = {e["run_id"]: e["type"] for chunk in session.data_to_send("list") for e in decode_events(chunk)
              if e["type"] in ("task_result", "task_error", "task_cancelled")}
    assert events == {"sleep:short": "task_result", "sleep:long": "task_cancelled"}, (
        "a requeue run ends silently: its client delivers it elsewhere")
    await session.receive(_command(tasks.add, {"a": 1, "b": 1}, "add:late"))
    assert not session.events_pending, "an ended session takes nothing more"


async def test_authentication_happens_before_decoding() -> None:
    service = WorkerService(security={"type": "bearer", "token": "t0ken"})
    with pytest.raises(Rejected) as missing:
        service.precheck({})
    assert missing.value.status == 401
    with pytest.raises(Rejected) as wrong:
        service.authenticate({"authorization": "Bearer nope"}, transport="http", target="/wove", body=b"{}")
    assert wrong.value.status == 403 and wrong.value.reason == "permission_denied"
    service.authenticate({"authorization": "Bearer t0ken"}, transport="http", target="/wove", body=b"{}")
