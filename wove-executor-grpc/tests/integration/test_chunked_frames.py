"""Chunked binary frames on the Session stream (``binary_chunks``), against real servers.

A recording proxy (raw-bytes generic handlers forwarding every message unchanged) sits
between our executor and our server; it can also hide the capability from either side, as
an older peer of ours would: the worker's offer in the confirmation, or the client's ask in
the call metadata.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import pytest

from wove.errors import EnvironmentExecutionError
from wove.framing import ChunkAssembler, capability_names, chunks
from wove.protocol import (
    BINARY_MAGIC,
    CAPABILITY_BINARY_CHUNKS,
    binary_frame_size,
    encode_binary_parts,
    encode_frame,
)
from wove.runtime import ExecutorRuntime
from wove.testing import tasks
from wove_executor_grpc.chunking import CHUNK_BYTES, CHUNKED_ABOVE, Parts
from wove_executor_grpc.server import SERVICE, SESSION_METHOD, GrpcWorkerServer, start_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MIB = 1 << 20
UNLIMITED = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


@dataclass
class Wire:
    """The Session messages that crossed the proxy, by size; what to hide."""

    target: str = ""
    hide: str = ""  # "offer": the worker's binary_chunks; "ask": the client's
    requests: list[bytes] = field(default_factory=list)
    replies: list[bytes] = field(default_factory=list)
    asked: str = ""  # the wove-capabilities the client's Session call carried


def _without_chunks(value: Any) -> str:
    return ", ".join(sorted(capability_names(value) - {CAPABILITY_BINARY_CHUNKS}))


@pytest.fixture
async def proxy(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Wire, GrpcWorkerServer]]:
    """Our server behind a recording Session proxy (request.param: what to hide)."""
    upstream = await start_server(max_message_bytes=512 * MIB)
    channel = grpc.aio.insecure_channel(upstream.target, options=UNLIMITED)
    wire = Wire(hide=getattr(request, "param", ""))

    async def session(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        metadata = []
        for item in context.invocation_metadata() or ():
            if item.key.startswith("grpc-"):
                continue
            value = item.value
            if item.key == "wove-capabilities":
                wire.asked = str(value)
                value = _without_chunks(value) if wire.hide == "ask" else value
            metadata.append((item.key, value))
        call = channel.stream_stream(SESSION_METHOD)(metadata=tuple(metadata))
        confirmation = [(key, _without_chunks(value) if key == "wove-capabilities" and wire.hide == "offer"
                         else value) for key, value in await call.initial_metadata() or ()]
        await context.send_initial_metadata(tuple(confirmation))

        async def pump() -> None:
            async for message in requests:
                wire.requests.append(message[:64] + len(message).to_bytes(8, "big"))
                await call.write(message)
            await call.done_writing()

        pumping = asyncio.get_running_loop().create_task(pump())
        try:
            async for reply in call:
                wire.replies.append(reply[:64] + len(reply).to_bytes(8, "big"))
                yield reply
        finally:
            pumping.cancel()

    server = grpc.aio.server(options=UNLIMITED)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {
        "Session": grpc.stream_stream_rpc_method_handler(session)})])
    wire.target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    yield wire, upstream
    await server.stop(None)
    await channel.close()
    await upstream.stop(1.0)


def _size(record: bytes) -> int:
    return int.from_bytes(record[-8:], "big")


def _big_messages(records: list[bytes], size: int) -> tuple[int, list[int]]:
    """The size of the first binary frame of at least ``size`` bytes, and the sizes of the
    messages from the one that starts it on."""
    for index, record in enumerate(records):
        if record.startswith(BINARY_MAGIC) and binary_frame_size(record[:16]) >= size:
            return binary_frame_size(record[:16]), [_size(r) for r in records[index:]]
    raise AssertionError(f"no binary frame of {size} bytes: {[_size(r) for r in records]}")


def runtime_for(target: str, **config: Any) -> ExecutorRuntime:
    return ExecutorRuntime({"w": {"executor": "grpc", "executor_config": {"target": target, **config}}}, {})


async def test_a_large_frame_travels_in_chunks_both_ways(proxy: tuple[Wire, GrpcWorkerServer]) -> None:
    wire, _ = proxy
    data = os.urandom(100 * MIB)
    async with runtime_for(wire.target, max_message_bytes=512 * MIB) as runtime:
        result = await runtime.call("w", tasks.echo, data)
        assert result == data and type(result) is bytes
        assert await runtime.call("w", tasks.echo, b"small") == b"small"  # the stream goes on after chunks
    assert CAPABILITY_BINARY_CHUNKS in capability_names(wire.asked)
    for book in (wire.requests, wire.replies):
        frame, sizes = _big_messages(book, 100 * MIB)
        count = -(-frame // CHUNK_BYTES)  # the frame's chunks: all CHUNK_BYTES but the last
        assert sizes[:count - 1] == [CHUNK_BYTES] * (count - 1) and sum(sizes[:count]) == frame, sizes[:4]


async def test_frames_up_to_the_threshold_are_not_chunked(proxy: tuple[Wire, GrpcWorkerServer]) -> None:
    wire, _ = proxy
    data = os.urandom(CHUNKED_ABOVE // 2)
    async with runtime_for(wire.target) as runtime:
        assert await runtime.call("w", tasks.echo, data) == data
    assert max(map(_size, wire.requests)) > CHUNKED_ABOVE // 2
    assert max(map(_size, wire.replies)) > CHUNKED_ABOVE // 2


@pytest.mark.parametrize("proxy", ["offer", "ask"], indirect=True)
async def test_a_peer_without_the_capability_gets_whole_frames(proxy: tuple[Wire, GrpcWorkerServer]) -> None:
    # "offer": a worker that does not announce binary_chunks gets each command whole;
    # "ask": a client that does not ask for them gets each result whole
    wire, _ = proxy
    data = os.urandom(12 * MIB)
    async with runtime_for(wire.target) as runtime:
        assert await runtime.call("w", tasks.echo, data) == data
    whole, other = (wire.requests, wire.replies) if wire.hide == "offer" else (wire.replies, wire.requests)
    frame, sizes = _big_messages(whole, 12 * MIB)
    assert sizes[0] == frame
    assert _big_messages(other, 12 * MIB)[1][0] == CHUNK_BYTES  # the side that negotiated still chunks


async def test_a_chunked_command_over_the_workers_limit_ends_the_session() -> None:
    server = await start_server(max_message_bytes=8 * MIB)
    try:
        async with runtime_for(server.target, max_message_bytes=64 * MIB) as runtime:
            with pytest.raises(EnvironmentExecutionError, match="RESOURCE_EXHAUSTED"):
                await runtime.call("w", tasks.echo, os.urandom(12 * MIB))
            assert await runtime.call("w", tasks.echo, b"ok") == b"ok"  # a new Session serves the next run
    finally:
        await server.stop(1.0)


def test_chunks_reassemble_into_the_frame() -> None:
    frame = {"type": "run_task", "run_id": "r", "task_id": "t", "callable": tasks.echo,
             "args": {"data": os.urandom(3 * CHUNK_BYTES + 123)}}
    parts = Parts(encode_binary_parts(frame))
    joined = parts.join()
    assert joined == encode_frame(frame, binary=True) and len(parts) == len(joined)
    messages = list(chunks(parts.parts, CHUNK_BYTES))
    assert [len(m) for m in messages[:-1]] == [CHUNK_BYTES] * (len(messages) - 1)
    seen: list[int] = []
    reassembler = ChunkAssembler(seen.append, drop_refused=True)
    out = [reassembler.feed(m) for m in messages]
    assert out[:-1] == [None] * (len(messages) - 1) and out[-1] == joined and seen == [len(joined)]
    assert reassembler.feed(b'{"type":"x"}') == b'{"type":"x"}'  # anything else passes as it is


def test_a_refused_chunked_frame_is_dropped_whole_then_reported() -> None:
    frame = {"type": "run_task", "run_id": "r", "task_id": "t", "callable": tasks.echo,
             "args": {"data": os.urandom(2 * CHUNK_BYTES + 5)}}
    messages = list(chunks(encode_binary_parts(frame), CHUNK_BYTES))

    def refuse(size: int) -> None:
        raise ValueError(f"{size} is too large")

    reassembler = ChunkAssembler(refuse, drop_refused=True)
    assert [reassembler.feed(m) for m in messages[:-1]] == [None] * (len(messages) - 1)
    with pytest.raises(ValueError, match="too large"):
        reassembler.feed(messages[-1])
    assert reassembler.feed(b"[]") == b"[]" and reassembler.pending == 0
