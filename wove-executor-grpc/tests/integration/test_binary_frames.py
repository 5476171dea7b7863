"""Binary frames and payload limits over gRPC, against real servers on 127.0.0.1.

What travels is observed on the wire: a recording proxy (raw-bytes generic handlers that
forward every message to our server unchanged) sits between our executor and our server,
and a Wove 2.x-style stub (``Send`` only, written from the wire format) records what a
2.x peer is sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from wove.errors import EnvironmentExecutionError, PayloadTooLargeError
from wove.protocol import (
    CAPABILITY_BINARY_FRAMES,
    TERMINAL_EVENTS,
    decode_command,
    decode_events,
    encode_event,
    encode_frame,
    is_binary,
)
from wove.runtime import ExecutorRuntime
from wove.testing import tasks
from wove.worker import WorkerEngine
from wove_executor_grpc import GrpcEnvironmentExecutor
from wove_executor_grpc.server import (
    SEND_METHOD,
    SERVICE,
    SESSION_METHOD,
    STREAM_METHOD,
    GrpcWorkerServer,
    start_server,
)

pytestmark = pytest.mark.integration

SECRET = "grpc-binary-secret"
KIB = 1024
BIG = 256 * KIB  # well above the 16 KiB out-of-band threshold
LARGE = [("auto", SESSION_METHOD), (False, SEND_METHOD), (True, STREAM_METHOD)]
UNLIMITED = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def payload() -> dict[str, Any]:
    return {
        "b": b"b" * BIG,
        "ba": bytearray(b"a" * BIG),
        "mv": memoryview(b"m" * BIG),
        "nested": [{"deep": (b"d" * BIG, bytearray(b"e" * BIG), 3)}, {"small": b"tiny", "text": "ok"}],
    }


def run_frame(func: Any, args: dict[str, Any]) -> dict[str, Any]:
    return {"type": "run_task", "run_id": f"t:{time.monotonic_ns():x}", "task_id": "t", "callable": func,
            "args": args, "delivery": {"delivery_orphan_policy": "cancel"}}


def sign(body: bytes, method: str) -> tuple[tuple[str, str], ...]:
    """Signed metadata from the documented scheme (independently of wove.security)."""
    stamp, nonce = str(int(time.time())), f"n{time.monotonic_ns()}"
    canonical = "\n".join(["wove-v1", "grpc", method, stamp, nonce, hashlib.sha256(body).hexdigest()])
    signature = "v1=" + hmac.new(SECRET.encode(), canonical.encode(), hashlib.sha256).hexdigest()
    return (("x-wove-key", "default"), ("x-wove-timestamp", stamp), ("x-wove-nonce", nonce),
            ("x-wove-signature", signature))


def runtime_for(target: str, **config: Any) -> ExecutorRuntime:
    return runtime_with(target, **config)[0]


def runtime_with(target: str, **config: Any) -> tuple[ExecutorRuntime, GrpcEnvironmentExecutor]:
    executor = GrpcEnvironmentExecutor()
    environments = {"w": {"executor": executor, "executor_config": {"target": target, **config}}}
    return ExecutorRuntime(environments, {}), executor


@dataclass
class Wire:
    """What crossed the proxy: per method, the kinds of requests and replies."""

    target: str = ""
    requests: dict[str, Counter[str]] = field(default_factory=dict)
    replies: dict[str, Counter[str]] = field(default_factory=dict)

    def saw(self, book: dict[str, Counter[str]], method: str, message: bytes) -> None:
        book.setdefault(method, Counter())["binary" if is_binary(message) else "json"] += 1


def _forwarded(context: grpc.aio.ServicerContext) -> tuple[tuple[str, Any], ...]:
    return tuple((m.key, m.value) for m in context.invocation_metadata() or () if not m.key.startswith("grpc-"))


@pytest.fixture
async def proxy(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Wire, GrpcWorkerServer]]:
    """Our server behind a proxy that records every message (request.param: server kwargs)."""
    upstream = await start_server(**getattr(request, "param", {}))
    channel = grpc.aio.insecure_channel(upstream.target, options=UNLIMITED)
    wire = Wire()

    async def send(message: bytes, context: grpc.aio.ServicerContext) -> bytes:
        wire.saw(wire.requests, SEND_METHOD, message)
        try:
            reply: bytes = await channel.unary_unary(SEND_METHOD)(message, metadata=_forwarded(context))
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "")
        wire.saw(wire.replies, SEND_METHOD, reply)
        return reply

    async def stream(message: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        wire.saw(wire.requests, STREAM_METHOD, message)
        async for reply in channel.unary_stream(STREAM_METHOD)(message, metadata=_forwarded(context)):
            wire.saw(wire.replies, STREAM_METHOD, reply)
            yield reply

    async def session(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        call = channel.stream_stream(SESSION_METHOD)(metadata=_forwarded(context))
        await context.send_initial_metadata(tuple(await call.initial_metadata() or ()))

        async def pump() -> None:
            async for message in requests:
                wire.saw(wire.requests, SESSION_METHOD, message)
                await call.write(message)
            await call.done_writing()

        pumping = asyncio.get_running_loop().create_task(pump())
        try:
            async for reply in call:
                wire.saw(wire.replies, SESSION_METHOD, reply)
                yield reply
        finally:
            pumping.cancel()

    server = grpc.aio.server(options=UNLIMITED)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {
        "Send": grpc.unary_unary_rpc_method_handler(send),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
        "Session": grpc.stream_stream_rpc_method_handler(session),
    })])
    wire.target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    yield wire, upstream
    await server.stop(None)
    await channel.close()
    await upstream.stop(1.0)


# -- between ours: binary, and equal results --------------------------------------------
@pytest.mark.parametrize(("streaming", "method"), LARGE)
async def test_large_buffers_round_trip_as_binary_frames(proxy: tuple[Wire, GrpcWorkerServer], streaming: Any,
                                                         method: str) -> None:
    wire, _ = proxy
    runtime, executor = runtime_with(wire.target, streaming=streaming)
    async with runtime:
        sent = payload()
        result = await runtime.call("w", tasks.echo, sent)
        assert CAPABILITY_BINARY_FRAMES in executor.capabilities
    assert result["b"] == sent["b"] and type(result["b"]) is bytes
    assert result["ba"] == sent["ba"] and type(result["ba"]) is bytearray
    assert bytes(result["mv"]) == bytes(sent["mv"])
    assert result["nested"] == sent["nested"]
    assert wire.requests[method] == {"binary": 1}, wire.requests
    # the bulky result is binary; a small event (Stream's task_started) stays JSON
    assert wire.replies[method]["binary"] == 1 and set(wire.replies[method]) <= {"binary", "json"}, wire.replies


@pytest.mark.parametrize(("streaming", "method"), LARGE[:2])
async def test_binary_frames_false_keeps_json(proxy: tuple[Wire, GrpcWorkerServer], streaming: Any,
                                              method: str) -> None:
    wire, _ = proxy
    async with runtime_for(wire.target, streaming=streaming, binary_frames=False) as runtime:
        sent = payload()
        assert (await runtime.call("w", tasks.echo, sent))["nested"] == sent["nested"]
    assert wire.requests[method] == {"json": 1}, wire.requests
    assert set(wire.replies[method]) == {"json"}, wire.replies


@pytest.mark.parametrize("proxy", [{"security": {"type": "signed", "secret": SECRET}}], indirect=True)
@pytest.mark.parametrize(("streaming", "method"), LARGE)
async def test_signed_and_binary(proxy: tuple[Wire, GrpcWorkerServer], streaming: Any, method: str) -> None:
    # Session: signed once at open (empty body); Send / Stream: over the binary request bytes
    wire, _ = proxy
    config = {"streaming": streaming, "security": {"type": "signed", "secret": SECRET}}
    async with runtime_for(wire.target, **config) as runtime:
        assert (await runtime.call("w", tasks.echo, {"k": b"s" * BIG}))["k"] == b"s" * BIG
        assert await runtime.call("w", tasks.add, 2, 3) == 5
    # the bulky call goes binary, the small one stays JSON (wove.framing.worth_binary)
    assert wire.requests[method] == {"binary": 1, "json": 1}, wire.requests


# -- our worker, by hand on the wire -----------------------------------------------------
@pytest.mark.parametrize("server_kwargs", [{}, {"security": {"type": "signed", "secret": SECRET}}])
async def test_the_worker_answers_a_hand_made_binary_frame_in_binary(server_kwargs: dict[str, Any]) -> None:
    running = await start_server(**server_kwargs)
    signed = bool(server_kwargs)
    try:
        async with grpc.aio.insecure_channel(running.target) as channel:
            body = encode_frame(run_frame(tasks.echo, {"value": b"v" * BIG}), binary=True)
            reply = await channel.unary_unary(SEND_METHOD)(body, metadata=sign(body, SEND_METHOD) if signed else None)
            assert is_binary(reply)
            assert decode_events(reply)[-1]["result"] == b"v" * BIG

            body = encode_frame(run_frame(tasks.echo, {"value": bytearray(BIG)}), binary=True)
            call = channel.unary_stream(STREAM_METHOD)(body, metadata=sign(body, STREAM_METHOD) if signed else None)
            messages = [message async for message in call]
            assert messages and is_binary(messages[-1])  # task_started, small, may come first as JSON
            assert decode_events(messages[-1])[-1]["result"] == bytearray(BIG)

            session = channel.stream_stream(SESSION_METHOD)(metadata=sign(b"", SESSION_METHOD) if signed else None)
            announced = dict(await session.initial_metadata())["wove-capabilities"]
            assert CAPABILITY_BINARY_FRAMES in [part.strip() for part in announced.split(",")]
            first, second = run_frame(tasks.add, {"a": 1, "b": 2}), run_frame(tasks.echo, {"value": b"x" * BIG})
            await session.write(encode_frame(first, binary=True) + encode_frame(second, binary=True))  # back to back
            await session.done_writing()
            events = []
            kinds = set()
            async for message in session:
                kinds.add(is_binary(message))
                events += decode_events(message)
            results = {e["run_id"]: e["result"] for e in events if e["type"] == "task_result"}
            assert results == {first["run_id"]: 3, second["run_id"]: b"x" * BIG}
            assert kinds == {True, False}, "the bulky result in binary, the small events in JSON"

            # a JSON client (Wove 2.x) still gets JSON
            body = encode_frame(run_frame(tasks.add, {"a": 2, "b": 2}))
            reply = await channel.unary_unary(SEND_METHOD)(body, metadata=sign(body, SEND_METHOD) if signed else None)
            assert not is_binary(reply) and reply.startswith(b'{"events":[')
            assert decode_events(reply)[-1]["result"] == 4
    finally:
        await running.stop(1.0)


# -- a Wove 2.x peer -------------------------------------------------------------------
async def test_a_wove2_server_is_sent_json() -> None:
    engine = WorkerEngine(name="v2-stub")
    kinds: Counter[str] = Counter()

    async def send(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        kinds["binary" if is_binary(request) else "json"] += 1
        frame = decode_command(request)
        encoded: list[bytes] = []
        done = asyncio.get_running_loop().create_future()

        def sink(event: dict[str, Any]) -> None:
            if event["type"] != "heartbeat":
                encoded.append(encode_event(event))
            if event["type"] in TERMINAL_EVENTS and not done.done():
                done.set_result(None)

        await engine.submit(frame, sink)
        await done
        return b'{"events":[' + b",".join(encoded) + b"]}"

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        SERVICE, {"Send": grpc.unary_unary_rpc_method_handler(send)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        for streaming in ("auto", False):
            runtime, executor = runtime_with(f"127.0.0.1:{port}", streaming=streaming)
            async with runtime:
                assert await runtime.call("w", tasks.echo, b"p" * BIG) == b"p" * BIG
                assert CAPABILITY_BINARY_FRAMES not in executor.capabilities
        assert kinds == {"json": 2}
    finally:
        await engine.aclose()
        await server.stop(None)


# -- size --------------------------------------------------------------------------------
@pytest.mark.timeout(120)
async def test_a_100_mib_argument_comes_back_as_a_100_mib_result(grpc_worker: Any) -> None:
    # the defaults on both sides (executor max_message_bytes / channel options, the worker's
    # --max-body-bytes) carry it: binary frames add no base64
    data = b"\x01" * (100 * 1024 * 1024)
    async with runtime_for(grpc_worker.target) as runtime:
        result = await runtime.call("w", tasks.echo, data)
    assert len(result) == len(data) and result == data


@pytest.mark.parametrize(("config", "setting"), [
    ({"max_message_bytes": 1_000_000}, "executor_config.max_message_bytes"),
    ({"options": {"grpc.max_send_message_length": 1_000_000}}, "grpc.max_send_message_length"),
])
@pytest.mark.parametrize("streaming", ["auto", False])
async def test_a_command_over_the_limit_fails_before_it_is_sent(
        proxy: tuple[Wire, GrpcWorkerServer], tmp_path: Path, config: dict[str, Any], setting: str,
        streaming: Any) -> None:
    wire, _ = proxy
    marker = tmp_path / "ran"
    async with runtime_for(wire.target, streaming=streaming, **config) as runtime:
        with pytest.raises(PayloadTooLargeError) as info:
            await runtime.call("w", tasks.record, str(marker), 0.0, "x" * 2_000_000)
        assert await runtime.call("w", tasks.add, 1, 1) == 2  # the environment goes on
    message = str(info.value)
    assert setting in message and "record" in message and "1000000" in message
    assert str(info.value.size) in message and info.value.size > 2_000_000 and info.value.limit == 1_000_000
    assert not marker.exists(), "the worker ran the refused run"
    assert sum(sum(c.values()) for c in wire.requests.values()) == 1, wire.requests  # only tasks.add went


async def test_a_result_over_the_receive_limit_names_the_setting(grpc_worker: Any) -> None:
    async with runtime_for(grpc_worker.target, max_message_bytes=1_000_000) as runtime:
        with pytest.raises(EnvironmentExecutionError, match="RESOURCE_EXHAUSTED") as info:
            await runtime.call("w", tasks.blob, 2_000_000)
    assert "executor_config.max_message_bytes" in str(info.value)


@pytest.mark.parametrize("streaming", ["auto", False])
async def test_large_payloads_log_one_warning_each_way(grpc_worker: Any, caplog: pytest.LogCaptureFixture,
                                                       streaming: Any) -> None:
    caplog.set_level(logging.WARNING)
    async with runtime_for(grpc_worker.target, streaming=streaming, payload_warning_bytes=100_000) as runtime:
        assert await runtime.call("w", len, b"a" * 200_000) == 200_000
        sent = [r for r in caplog.records if "payload_warning_bytes" in r.getMessage()]
        assert len(sent) == 1, [r.getMessage() for r in sent]
        assert "'len'" in sent[0].getMessage() and "arguments" in sent[0].getMessage()
        assert "KiB" in sent[0].getMessage()
        caplog.clear()
        assert len(await runtime.call("w", tasks.blob, 300_000)) == 300_000
        received = [r for r in caplog.records if "payload_warning_bytes" in r.getMessage()]
        assert len(received) == 1, [r.getMessage() for r in received]
        assert "'blob'" in received[0].getMessage() and "result" in received[0].getMessage()
