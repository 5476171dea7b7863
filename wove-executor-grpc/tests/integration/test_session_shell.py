"""The gRPC service as a shell over wove.session: per-call sessions on Send and Stream, the
status table for refusals, the Wove 2.x reply shape, and a Session that stops reading a
client that does not read its events."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from wove.protocol import TERMINAL_EVENTS, decode_events, encode_frame
from wove.session import Rejected
from wove.testing import tasks
from wove_executor_grpc.server import (
    REJECTED_STATUS,
    SEND_METHOD,
    SESSION_METHOD,
    STREAM_METHOD,
    GrpcWorkerServer,
    start_server,
)

pytestmark = pytest.mark.integration

BIG = 256 * 1024 * 1024


def frame(func: Any, args: dict[str, Any], **delivery: Any) -> dict[str, Any]:
    name = getattr(func, "__name__", "task")
    return {"type": "run_task", "run_id": f"{name}:{uuid.uuid4().hex}", "task_id": name, "callable": func,
            "args": args, "delivery": {"delivery_cancel_mode": "best_effort", **delivery}}


@pytest.fixture
async def server() -> AsyncIterator[GrpcWorkerServer]:
    running = await start_server()
    yield running
    await running.stop(1.0)


async def wait_for(condition: Any, what: str, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"gave up after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


async def call_once(channel: grpc.aio.Channel, method: str, body: bytes) -> list[dict[str, Any]]:
    """One Send or Stream call; its events."""
    if method == SEND_METHOD:
        return decode_events(await channel.unary_unary(method)(body, timeout=20))
    events: list[dict[str, Any]] = []
    async for message in channel.unary_stream(method)(body, timeout=20):
        events.extend(decode_events(message))
    return events


# -- refusals -------------------------------------------------------------------------
def test_every_refusal_reason_has_a_grpc_status() -> None:
    # every reason the session documents (Rejected refuses any other)
    assert {Rejected(reason, "x").reason for reason in REJECTED_STATUS} == {
        "unauthenticated", "permission_denied", "too_large", "bad_request"}
    assert {reason: getattr(grpc.StatusCode, name) for reason, name in REJECTED_STATUS.items()} == {
        "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
        "permission_denied": grpc.StatusCode.PERMISSION_DENIED,
        "too_large": grpc.StatusCode.RESOURCE_EXHAUSTED,
        "bad_request": grpc.StatusCode.INVALID_ARGUMENT,
    }


@pytest.mark.parametrize("method", [SEND_METHOD, STREAM_METHOD])
async def test_a_command_over_the_session_limit_is_resource_exhausted(method: str, tmp_path: Path) -> None:
    # grpc's own message limit raised above the worker's: the session's limit refuses it
    running = await start_server(max_message_bytes=10_000, options=[("grpc.max_receive_message_length", BIG)])
    marker = tmp_path / "ran"
    body = encode_frame(frame(tasks.record, {"path": str(marker), "padding": "x" * 20_000}))
    try:
        async with grpc.aio.insecure_channel(running.target) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call_once(channel, method, body)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "10000" in (info.value.details() or "") and "--max-body-bytes" in (info.value.details() or "")
            # and the service keeps serving
            events = await call_once(channel, method, encode_frame(frame(tasks.add, {"a": 1, "b": 2})))
            assert events[-1]["result"] == 3
    finally:
        await running.stop(1.0)
    assert not marker.exists()


async def test_unauthenticated_details_carry_the_fact_without_a_hint() -> None:
    running = await start_server(security={"type": "signed", "secret": "s3cret"})
    try:
        async with grpc.aio.insecure_channel(running.target) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary(SEND_METHOD)(encode_frame(frame(tasks.add, {"a": 1, "b": 1})), timeout=10)
    finally:
        await running.stop(1.0)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    details = info.value.details() or ""
    assert "signed requests" in details and "executor_config" not in details, details  # the client adds the fix


# -- the reply shape ----------------------------------------------------------------
@pytest.mark.parametrize("method", [SEND_METHOD, STREAM_METHOD])
async def test_a_quick_run_still_reports_task_started(server: GrpcWorkerServer, method: str) -> None:
    # an async task that ends in the same loop step as it starts: Wove 2.x replies carry
    # task_started and the terminal event
    async with grpc.aio.insecure_channel(server.target) as channel:
        events = await call_once(channel, method, encode_frame(frame(tasks.echo, {"value": 7})))
    assert [event["type"] for event in events] == ["task_started", "task_result"]


# -- a call that ends early: the one disconnect rule, per call ----------------------------
@pytest.mark.parametrize("method", [SEND_METHOD, STREAM_METHOD])
@pytest.mark.parametrize(("policy", "key"), [("requeue", None), ("detach", None), ("cancel", "report-9")])
async def test_a_kept_run_of_a_cancelled_call_finishes_once_for_its_redelivery(
        server: GrpcWorkerServer, method: str, policy: str, key: str | None, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    command = frame(tasks.record, {"path": str(marker), "seconds": 0.8}, delivery_orphan_policy=policy,
                    **({"delivery_idempotency_key": key} if key else {}))
    body = encode_frame(command)
    async with grpc.aio.insecure_channel(server.target) as channel:
        first = asyncio.ensure_future(call_once(channel, method, body))
        await wait_for(lambda: server.service.engine.active == 1, "the run to start")
        first.cancel()  # the client gives up on the call
        with pytest.raises(asyncio.CancelledError):
            await first
        await wait_for(lambda: lines(marker) == 1, "the kept run to finish without its call")
        events = await call_once(channel, method, body)  # the same run, delivered again
    assert events[-1]["type"] == "task_result" and events[-1]["result"] == str(marker), events[-1]
    assert lines(marker) == 1, "the re-delivered run executed a second time"


@pytest.mark.parametrize("method", [SEND_METHOD, STREAM_METHOD])
@pytest.mark.parametrize("policy", ["cancel", "fail"])
async def test_a_cancel_or_fail_run_of_a_cancelled_call_is_cancelled(
        server: GrpcWorkerServer, method: str, policy: str, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    body = encode_frame(frame(tasks.record, {"path": str(marker), "seconds": 0.8}, delivery_orphan_policy=policy))
    async with grpc.aio.insecure_channel(server.target) as channel:
        call = asyncio.ensure_future(call_once(channel, method, body))
        await wait_for(lambda: server.service.engine.active == 1, "the run to start")
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    await wait_for(lambda: server.service.engine.active == 0, "the run to be cancelled")
    await asyncio.sleep(1.0)  # past the run's own end
    assert not marker.exists(), f"a {policy} run went on after its call was cancelled"


async def test_a_shutdown_command_on_send_is_ignored(server: GrpcWorkerServer) -> None:
    async with grpc.aio.insecure_channel(server.target) as channel:
        reply = await channel.unary_unary(SEND_METHOD)(b'{"type": "shutdown"}', timeout=10)
        assert decode_events(reply) == []
        events = await call_once(channel, SEND_METHOD, encode_frame(frame(tasks.add, {"a": 2, "b": 2})))
    assert events[-1]["result"] == 4
    assert not server.worker.closing


# -- a slow reader ---------------------------------------------------------------------
async def test_a_session_stops_reading_commands_while_its_client_reads_no_events(
        server: GrpcWorkerServer) -> None:
    big = frame(tasks.echo, {"value": b"r" * (48 * 1024 * 1024)})  # blocks the writer: HTTP/2 flow control
    small = [frame(tasks.echo, {"value": i}) for i in range(server.worker.max_pending_events + 600)]
    options = [("grpc.max_receive_message_length", BIG), ("grpc.max_send_message_length", BIG)]
    async with grpc.aio.insecure_channel(server.target, options=options) as channel:
        call = channel.stream_stream(SESSION_METHOD)(timeout=60)

        async def write() -> None:
            await call.write(encode_frame(big))
            for command in small:
                await call.write(encode_frame(command))
            await call.done_writing()

        writer = asyncio.ensure_future(write())
        await wait_for(lambda: any(s.reading_paused for s in server.worker.sessions), "reading to pause", 30)
        # every event still arrives once the client reads
        results: dict[str, Any] = {}
        async for message in call:
            results.update({e["run_id"]: e for e in decode_events(message) if e["type"] in TERMINAL_EVENTS})
        await writer
        assert await call.code() == grpc.StatusCode.OK
    assert [results[c["run_id"]]["result"] for c in small] == list(range(len(small)))
    assert len(results[big["run_id"]]["result"]) == 48 * 1024 * 1024
