"""Binary frames and payload limits over WebSocket: our executor against our worker, a raw
client against our worker, and our executor against stub workers that do or do not
announce ``binary_frames``."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from wove.errors import PayloadTooLargeError
from wove.framing import ChunkAssembler, chunks
from wove.protocol import (
    CAPABILITY_BINARY_CHUNKS,
    CAPABILITY_BINARY_FRAMES,
    CAPABILITY_COMMAND_LISTS,
    decode_command,
    decode_events,
    encode_binary_parts,
    encode_frame,
    is_binary,
)
from wove.runtime import ExecutorRuntime
from wove.testing import tasks
from wove_executor_ws import WebSocketEnvironmentExecutor
from wove_executor_ws.executor import LIST_COMMANDS
from wove_executor_ws.frames import CHUNK_BYTES
from wove_executor_ws.server import WebSocketWorkerServer

HEADER = "X-Wove-Capabilities"
BIG = 64 * 1024


def runtime_for(url: str, **config: Any) -> ExecutorRuntime:
    return ExecutorRuntime({"ws": {"executor": "websocket", "executor_config": {"url": url, **config}}}, {})


@pytest.fixture
async def server() -> AsyncIterator[WebSocketWorkerServer]:
    async with WebSocketWorkerServer(port=0) as running:
        yield running


def marking_echo(marker: Path) -> Callable[[Any], Any]:
    """A task (pickled by value) that writes ``marker``, then returns its argument."""
    path = str(marker)

    def marked(value: Any) -> Any:
        with open(path, "w") as fh:
            fh.write("ran")
        return value

    return marked


def plain(value: Any) -> Any:
    """``value`` with every buffer as bytes, for comparisons."""
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(item) for item in value)
    return value


# -- our executor and our worker ------------------------------------------------------
@pytest.mark.parametrize("binary_frames", [True, False], ids=["binary", "json"])
async def test_buffers_round_trip(server: WebSocketWorkerServer, binary_frames: bool) -> None:
    values: list[Any] = [
        bytes(range(256)) * (BIG // 256),
        bytearray(b"b" * BIG),
        memoryview(b"m" * BIG),
        {"blob": b"x" * BIG, "nested": [bytearray(b"y" * (BIG + 1)), (b"small", memoryview(b"z" * BIG))], "n": 7},
        b"tiny",
    ]
    async with runtime_for(server.url, binary_frames=binary_frames) as runtime:
        results = await asyncio.wait_for(asyncio.gather(*(runtime.call("ws", tasks.echo, v) for v in values)), 30)
    for value, result in zip(values, results):
        assert plain(result) == plain(value)
    assert isinstance(results[0], bytes) and isinstance(results[3]["blob"], bytes)


async def test_the_worker_announces_binary_frames_and_our_executor_sees_it(server: WebSocketWorkerServer) -> None:
    for binary_frames in (True, False):
        executor = WebSocketEnvironmentExecutor()
        await executor.start(environment_name="ws", environment_config={"url": server.url,
                                                                        "binary_frames": binary_frames}, run_config={})
        try:
            assert CAPABILITY_BINARY_FRAMES in executor.capabilities  # what the worker offers
        finally:
            await executor.stop()


@pytest.mark.timeout(120)
async def test_a_100_mib_argument_and_result(server: WebSocketWorkerServer) -> None:
    blob = b"\x01" * (100 * 1024 * 1024)
    async with runtime_for(server.url) as runtime:
        result = await asyncio.wait_for(runtime.call("ws", tasks.echo, blob), 110)
    assert len(result) == len(blob) and result == blob


# -- a raw client on the wire against our worker ----------------------------------------
def run_task(value: Any) -> dict[str, Any]:
    return {"type": "run_task", "run_id": f"r:{uuid.uuid4().hex}", "task_id": "r", "callable": tasks.echo,
            "args": {"value": value}, "delivery": {"delivery_orphan_policy": "cancel"}}


async def answers(ws: Any, run_id: str) -> list[tuple[bool, dict[str, Any]]]:
    """(was a binary message, event) for each event of ``run_id`` up to its result."""
    seen: list[tuple[bool, dict[str, Any]]] = []
    while True:
        message = await asyncio.wait_for(ws.recv(), 10)
        events = decode_events(message)
        seen.extend((isinstance(message, bytes), event) for event in events if event["run_id"] == run_id)
        if any(event["type"] == "task_result" and event["run_id"] == run_id for event in events):
            return seen


async def test_a_binary_frame_is_answered_in_binary(server: WebSocketWorkerServer) -> None:
    from websockets.asyncio.client import connect

    blob = b"q" * BIG
    async with connect(server.url, proxy=None, max_size=None, compression="deflate") as ws:
        assert CAPABILITY_BINARY_FRAMES in ws.response.headers[HEADER]
        assert ws.protocol.extensions == []  # the worker never deflates (pickles and buffers rarely shrink)
        frame = run_task(blob)
        data = encode_frame(frame, binary=True)
        assert is_binary(data)
        await ws.send(data)  # bytes: a binary WebSocket message
        seen = await answers(ws, frame["run_id"])
    binary, result = seen[-1]
    assert binary and result["result"] == blob


async def test_the_handshake_header_asks_for_binary_answers(server: WebSocketWorkerServer) -> None:
    from websockets.asyncio.client import connect

    async with connect(server.url, proxy=None, max_size=None,
                       additional_headers={HEADER: CAPABILITY_BINARY_FRAMES}) as ws:
        big, small = run_task(b"h" * BIG), run_task(3)
        await ws.send(encode_frame(big), text=True)  # JSON commands
        await ws.send(encode_frame(small), text=True)
        big_seen, small_seen = await answers(ws, big["run_id"]), await answers(ws, small["run_id"])
    assert big_seen[-1][0] is True and big_seen[-1][1]["result"] == b"h" * BIG  # bulky: binary
    assert small_seen[-1][0] is False and small_seen[-1][1]["result"] == 3  # small events stay JSON


async def test_a_json_client_gets_only_json(server: WebSocketWorkerServer) -> None:
    from websockets.asyncio.client import connect

    async with connect(server.url, proxy=None, max_size=None) as ws:  # as Wove 2.x: no header, JSON only
        frame = run_task(b"j" * BIG)
        await ws.send(encode_frame(frame), text=True)
        seen = await answers(ws, frame["run_id"])
    assert all(not binary for binary, _event in seen)
    assert seen[-1][1]["result"] == b"j" * BIG


# -- binary chunks ---------------------------------------------------------------------
CHUNKED = 3 * 1024 * 1024 + 5  # more than CHUNK_BYTES: three full chunks and a short one


async def test_a_chunked_command_is_assembled_and_answered_in_chunks_to_a_client_that_reads_them(
    server: WebSocketWorkerServer,
) -> None:
    from websockets.asyncio.client import connect

    blob = bytes(range(256)) * (CHUNKED // 256) + b"tail!"
    frame = run_task(blob)
    pieces = list(chunks(encode_binary_parts(frame), CHUNK_BYTES))
    assert len(pieces) == 4 and max(map(len, pieces)) == CHUNK_BYTES
    asked = f"{CAPABILITY_BINARY_FRAMES}, {CAPABILITY_BINARY_CHUNKS}"
    async with connect(server.url, proxy=None, max_size=None, additional_headers={HEADER: asked}) as ws:
        assert CAPABILITY_BINARY_CHUNKS in ws.response.headers[HEADER]
        for piece in pieces:
            await ws.send(bytes(piece))
        assembler = ChunkAssembler()
        messages = 0
        while True:
            message = await asyncio.wait_for(ws.recv(), 20)
            messages += 1
            whole = assembler.feed(message)
            if whole is None:
                assert isinstance(message, bytes) and len(message) == CHUNK_BYTES
                continue
            events = [event for event in decode_events(whole) if event["run_id"] == frame["run_id"]]
            if any(event["type"] == "task_result" for event in events):
                break
    assert events[-1]["result"] == blob
    assert messages >= 4  # the result came in chunks too


async def test_a_client_that_does_not_read_chunks_gets_one_message(server: WebSocketWorkerServer) -> None:
    from websockets.asyncio.client import connect

    blob = b"w" * CHUNKED
    async with connect(server.url, proxy=None, max_size=None,
                       additional_headers={HEADER: CAPABILITY_BINARY_FRAMES}) as ws:
        frame = run_task(blob)
        await ws.send(encode_frame(frame, binary=True))  # one message, as before chunks
        seen = await answers(ws, frame["run_id"])
    assert seen[-1] == (True, seen[-1][1]) and seen[-1][1]["result"] == blob


async def test_a_chunked_frame_over_the_limit_is_refused_before_it_is_assembled(tmp_path: Path) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    marker = tmp_path / "marker"
    frame = {**run_task(b"x" * CHUNKED), "callable": marking_echo(marker)}
    first = next(chunks(encode_binary_parts(frame), CHUNK_BYTES))
    async with WebSocketWorkerServer(port=0, max_size=2 * 1024 * 1024) as small:
        async with connect(small.url, proxy=None, max_size=None) as ws:
            await ws.send(first)  # declares a frame over 2 MiB in its prefix
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 10)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009
        assert "limit" in info.value.rcvd.reason
    assert not marker.exists()


@pytest.mark.parametrize("announce_chunks", [True, False], ids=["chunks-offered", "no-chunks"])
async def test_our_executor_chunks_large_commands_only_for_a_worker_that_reads_them(announce_chunks: bool) -> None:
    blob = b"k" * CHUNKED
    async with StubWorker(True, chunks=announce_chunks) as stub, runtime_for(stub.url) as runtime:
        assert await asyncio.wait_for(runtime.call("ws", tasks.echo, blob), 20) == blob
    assert stub.binary_messages == (4 if announce_chunks else 1)


# -- our executor against stub workers ---------------------------------------------------
class StubWorker:
    """A minimal worker that echoes ``args['value']`` back, recording what it received;
    ``announce`` puts ``binary_frames`` in its handshake answer (a Wove 2.x worker does not)."""

    def __init__(self, announce: bool, *, lists: bool = False, chunks: bool = False) -> None:
        self.announce = announce
        self.lists = lists
        self.chunks = chunks
        self.assembler = ChunkAssembler()
        self.asked: list[str] = []
        self.binary_messages = 0
        self.text_messages = 0
        #: run_task commands per message, in arrival order
        self.commands_per_message: list[int] = []
        self.url = ""
        self._server: Any = None

    async def __aenter__(self) -> StubWorker:
        from websockets.asyncio.server import serve

        def process_response(connection: Any, request: Any, response: Any) -> None:
            self.asked.append(request.headers.get(HEADER, ""))
            offered = ([CAPABILITY_BINARY_FRAMES] if self.announce else []) + \
                ([CAPABILITY_COMMAND_LISTS] if self.lists else []) + ([CAPABILITY_BINARY_CHUNKS] if self.chunks else [])
            if offered:
                response.headers[HEADER] = ", ".join(offered)

        self._server = await serve(self._handle, "127.0.0.1", 0, process_response=process_response, max_size=None)
        self.url = f"ws://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/wove"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, ws: Any) -> None:
        async for message in ws:
            binary = isinstance(message, bytes)
            if binary:
                self.binary_messages += 1
            else:
                self.text_messages += 1
            if binary and self.chunks:
                whole = self.assembler.feed(message)
                if whole is None:
                    continue
                message = bytes(whole)
            parsed = json.loads(message) if not binary and message.startswith("[") else [message]
            assert self.lists or len(parsed) == 1, "a list sent to a worker that did not offer command_lists"
            commands = [decode_command(json.dumps(item) if isinstance(item, dict) else item) for item in parsed]
            self.commands_per_message.append(sum(command["type"] == "run_task" for command in commands))
            for command in commands:
                if command["type"] != "run_task":
                    continue
                event = {"type": "task_result", "run_id": command["run_id"], "task_id": command["task_id"],
                         "result": command["args"]["value"]}
                await ws.send(encode_frame(event, binary=binary), text=not binary)


@pytest.mark.parametrize(("announce", "binary_frames", "expect_binary"), [
    (True, True, True), (True, False, False), (False, True, False),
], ids=["offered-and-on", "offered-but-off", "wove2-worker"])
async def test_binary_only_to_a_worker_that_offers_it_and_only_when_on(
    announce: bool, binary_frames: bool, expect_binary: bool
) -> None:
    blob = b"s" * BIG
    async with StubWorker(announce) as stub, runtime_for(stub.url, binary_frames=binary_frames) as runtime:
        assert await asyncio.wait_for(runtime.call("ws", tasks.echo, blob), 10) == blob
        assert await asyncio.wait_for(runtime.call("ws", tasks.echo, 5), 10) == 5
    assert stub.asked == [f"{CAPABILITY_BINARY_FRAMES}, {CAPABILITY_BINARY_CHUNKS}" if binary_frames else ""]
    # the large command is binary when negotiated; the small one (and the shutdown) stay JSON
    assert stub.binary_messages == (1 if expect_binary else 0)
    assert stub.text_messages >= (1 if expect_binary else 2)


@pytest.mark.parametrize("lists", [True, False], ids=["command-lists-offered", "wove2-worker"])
async def test_commands_queued_together_go_as_one_list_only_to_a_worker_that_offers_it(lists: bool) -> None:
    blob = b"c" * BIG
    async with StubWorker(True, lists=lists) as stub, runtime_for(stub.url) as runtime:
        values = await asyncio.wait_for(asyncio.gather(*(runtime.call("ws", tasks.echo, i) for i in range(300))), 20)
        assert values == list(range(300))
        # a bulky command between small ones goes alone, as a binary message, in order
        mixed = await asyncio.wait_for(asyncio.gather(
            runtime.call("ws", tasks.echo, "a"), runtime.call("ws", tasks.echo, blob),
            runtime.call("ws", tasks.echo, "b")), 20)
        assert mixed == ["a", blob, "b"]
    runs = [count for count in stub.commands_per_message if count]
    assert sum(runs) == 303 and stub.binary_messages == 1
    if lists:
        assert len(runs) < 300 / 4 and max(runs) <= LIST_COMMANDS
    else:
        assert max(runs) == 1


async def offered(url: str) -> frozenset[str]:
    executor = WebSocketEnvironmentExecutor()
    await executor.start(environment_name="ws", environment_config={"url": url}, run_config={})
    try:
        return executor.capabilities
    finally:
        await executor.stop()


async def test_our_worker_offers_command_lists_and_reads_them(server: WebSocketWorkerServer) -> None:
    assert CAPABILITY_COMMAND_LISTS in await offered(server.url)
    async with runtime_for(server.url) as runtime:
        values = await asyncio.wait_for(asyncio.gather(*(runtime.call("ws", tasks.add, i, 1) for i in range(500))), 30)
    assert values == [i + 1 for i in range(500)]


async def test_a_worker_with_a_small_message_limit_does_not_offer_command_lists() -> None:
    async with WebSocketWorkerServer(port=0, max_size=64 * 1024) as small:
        capabilities = await offered(small.url)
        assert CAPABILITY_COMMAND_LISTS not in capabilities and CAPABILITY_BINARY_FRAMES in capabilities
        async with runtime_for(small.url) as runtime:
            values = await asyncio.wait_for(asyncio.gather(*(runtime.call("ws", tasks.add, i, 1) for i in range(300))), 30)
        assert values == [i + 1 for i in range(300)]


# -- limits --------------------------------------------------------------------------------
@pytest.mark.parametrize("binary_frames", [True, False], ids=["binary", "json"])
async def test_max_message_bytes_refuses_before_sending(
    server: WebSocketWorkerServer, binary_frames: bool, tmp_path: Path
) -> None:
    marker = tmp_path / "marker"
    async with runtime_for(server.url, max_message_bytes=1_000_000, binary_frames=binary_frames) as runtime:
        with pytest.raises(PayloadTooLargeError) as info:
            await asyncio.wait_for(runtime.call("ws", marking_echo(marker), b"x" * 2_000_000), 10)
        assert await asyncio.wait_for(runtime.call("ws", tasks.add, 1, 2), 10) == 3  # the connection is fine
    message = str(info.value)
    assert "max_message_bytes" in message and str(info.value.size) in message
    assert info.value.size > 2_000_000 and info.value.limit == 1_000_000
    assert not marker.exists()


async def test_large_payloads_warn_once_each(server: WebSocketWorkerServer, caplog: pytest.LogCaptureFixture) -> None:
    async with runtime_for(server.url, payload_warning_bytes=100_000) as runtime:
        with caplog.at_level(logging.WARNING, logger="wove"):
            assert await runtime.call("ws", tasks.echo, 4) == 4  # small: nothing
            assert len(await runtime.call("ws", tasks.echo, b"a" * 200_000)) == 200_000
            assert len(await runtime.call("ws", tasks.blob, 300_000)) == 300_000
    warnings = [r for r in caplog.records if "payload_warning_bytes" in r.getMessage()]
    by_task = {task: [r.getMessage() for r in warnings if f"task '{task}'" in r.getMessage()] for task in ("echo", "blob")}
    assert len(by_task["echo"]) == 2  # its argument and its result
    assert any("arguments" in m and "bytes)" in m for m in by_task["echo"])
    assert len(by_task["blob"]) == 1 and "result" in by_task["blob"][0] and "300" in by_task["blob"][0]
    assert len(warnings) == 3
