"""The websocket client's own frame handling: it splits the worker's byte stream into frames
itself and writes its own masked frames; everything unusual (control frames, fragments,
compressed or large frames, the closing handshake) still goes through ``websockets``.

These tests put the byte stream through the shapes that matter: a proxy re-chunks the
worker's answers (down to one byte per write, so frame heads and extended lengths arrive
in pieces), results straddle the size the client parses itself, and a hand-written Wove
2.x-protocol server answers with fragmented messages, pings, a compressed connection and
a going-away close.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from wove.protocol import decode_command, encode_frame
from wove.runtime import ExecutorRuntime
from wove.testing import tasks
from wove_executor_ws.executor import OWN_FRAME_BYTES

pytestmark = pytest.mark.timeout(60)


def runtime_for(url: str, **config: Any) -> ExecutorRuntime:
    return ExecutorRuntime({"ws": {"executor": "websocket", "executor_config": {"url": url, **config}}}, {})


@contextlib.asynccontextmanager
async def rechunking_proxy(target: str, split: Callable[[bytes], list[bytes]]) -> AsyncIterator[str]:
    """A TCP proxy to ``target`` (a ws:// URL) that writes the worker's bytes to the client
    in the pieces ``split`` makes, draining after each; yields the proxy's URL."""
    host_port, _, path = target.removeprefix("ws://").partition("/")
    host, _, port = host_port.rpartition(":")

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pieces: bool) -> None:
        try:
            while data := await reader.read(65536):
                for piece in (split(data) if pieces else [data]):
                    writer.write(piece)
                    await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    pipes: set[asyncio.Task[None]] = set()

    async def serve(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        worker_reader, worker_writer = await asyncio.open_connection(host, int(port))
        for task in (asyncio.create_task(pipe(client_reader, worker_writer, False)),
                     asyncio.create_task(pipe(worker_reader, client_writer, True))):
            pipes.add(task)
            task.add_done_callback(pipes.discard)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/{path}"
    finally:
        server.close()
        for task in list(pipes):
            task.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)
        await server.wait_closed()


def bytewise(data: bytes) -> list[bytes]:
    return [data[i:i + 1] for i in range(len(data))]


def random_pieces(seed: int) -> Callable[[bytes], list[bytes]]:
    chooser = random.Random(seed)

    def split(data: bytes) -> list[bytes]:
        pieces, position = [], 0
        while position < len(data):
            step = chooser.choice((1, 2, 3, 4, 9, 10, 11, 127, 4096))
            pieces.append(data[position:position + step])
            position += step
        return pieces

    return split


#: result sizes around the lengths that change a frame's head (125/126: 16-bit length,
#: 65535/65536: 64-bit length) and the largest frame the client parses itself
SIZES = [0, 1, 125, 126, 200, 65535, 65536, OWN_FRAME_BYTES - 200, OWN_FRAME_BYTES + 1, 300_000]


@pytest.mark.parametrize("split", [bytewise, random_pieces(7), random_pieces(11)], ids=["bytewise", "random-7", "random-11"])
async def test_answers_arriving_in_any_pieces_decode(shared_worker: Any, split: Callable[[bytes], list[bytes]]) -> None:
    small = SIZES[:5] if split is bytewise else SIZES  # one byte per write: keep it quick
    async with rechunking_proxy(shared_worker.url, split) as url, runtime_for(url, binary_frames=False) as runtime:
        for size in small:
            payload = b"w" * size
            assert await runtime.call("ws", tasks.echo, payload) == payload, size
        results = await asyncio.gather(*(runtime.call("ws", tasks.add, i, 1) for i in range(64)))
        assert results == [i + 1 for i in range(64)]


@pytest.mark.parametrize("binary_frames", [True, False], ids=["binary-frames", "json"])
async def test_results_on_both_sides_of_the_own_frame_size(shared_worker: Any, binary_frames: bool) -> None:
    async with runtime_for(shared_worker.url, binary_frames=binary_frames) as runtime:
        payloads = [bytes([size % 251]) * size for size in SIZES]
        results = await asyncio.gather(*(runtime.call("ws", tasks.echo, payload) for payload in payloads))
        assert [len(result) for result in results] == SIZES
        assert results == payloads


class TwoXServer:
    """A minimal Wove 2.x-protocol websocket server (JSON commands, JSON events) whose
    answer ``shape`` is chosen per test: 'plain', 'fragmented', 'ping-first' or
    'going-away' (the answer, then a 1001 close)."""

    def __init__(self, shape: str, *, compression: str | None = None) -> None:
        self.shape = shape
        self.compression = compression
        self.url = ""
        self.negotiated: list[str] = []
        self._server: Any = None

    async def __aenter__(self) -> TwoXServer:
        from websockets.asyncio.server import serve

        self._server = await serve(self._connection, "127.0.0.1", 0, compression=self.compression, max_size=None)
        self.url = f"ws://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/wove"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def _connection(self, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        self.negotiated.append(ws.response.headers.get("Sec-WebSocket-Extensions", ""))
        answers: set[asyncio.Task[None]] = set()
        try:
            async for message in ws:  # each command answered in its own task, as a worker does
                task = asyncio.create_task(self._answer(ws, message))
                answers.add(task)
                task.add_done_callback(answers.discard)
        except ConnectionClosed:
            pass
        finally:
            for task in list(answers):
                task.cancel()

    async def _answer(self, ws: Any, message: str | bytes) -> None:
        from websockets.exceptions import ConnectionClosed

        command = decode_command(message)
        if command["type"] != "run_task":
            return
        result = command["callable"](**command["args"])
        if inspect.isawaitable(result):
            result = await result
        event = encode_frame({"type": "task_result", "run_id": command["run_id"],
                              "task_id": command["task_id"], "result": result}).decode()
        try:
            if self.shape == "fragmented":
                await ws.send([event[:5], event[5:9], event[9:]])
            elif self.shape == "ping-first":
                await asyncio.wait_for(await ws.ping(), 10)  # the client answers before it gets its result
                await ws.send(event)
            else:
                await ws.send(event)
            if self.shape == "going-away":
                await ws.close(1001, "restarting")
        except ConnectionClosed:
            pass


@pytest.mark.parametrize("shape", ["plain", "fragmented", "ping-first"])
@pytest.mark.parametrize("compression", [None, "deflate"], ids=["uncompressed", "deflate"])
async def test_a_2x_server_answering_in_every_frame_shape(shape: str, compression: str | None) -> None:
    config = {"compression": "deflate"} if compression else {}
    async with TwoXServer(shape, compression=compression) as server, runtime_for(server.url, **config) as runtime:
        assert await runtime.call("ws", tasks.add, 2, 3) == 5
        big = "é" * 70_000  # text over the own-frame size, multi-byte UTF-8
        assert await runtime.call("ws", tasks.echo, big) == big
        results = await asyncio.gather(*(runtime.call("ws", tasks.add, i, i) for i in range(50)))
        assert results == [2 * i for i in range(50)]
    assert ("permessage-deflate" in server.negotiated[0]) == (compression is not None)


async def test_more_commands_than_one_draw_of_masks_all_arrive_intact() -> None:
    # the client draws its frame masks from os.urandom 1,024 at a time: frames past a draw
    # (a 2.x server, one message per command) must still unmask to the commands sent
    async with TwoXServer("plain") as server, runtime_for(server.url) as runtime:
        for start in range(0, 2600, 650):
            results = await asyncio.gather(*(runtime.call("ws", tasks.add, i, 1) for i in range(start, start + 650)))
            assert results == [i + 1 for i in range(start, start + 650)]


async def test_a_going_away_close_after_the_answer_is_reported_and_the_next_run_reconnects() -> None:
    async with TwoXServer("going-away") as server, runtime_for(
            server.url, reconnect_initial_delay=0.05, reconnect_max_delay=0.2) as runtime:
        assert await runtime.call("ws", tasks.add, 1, 1) == 2  # answered, then closed with 1001
        assert await runtime.call("ws", tasks.add, 2, 2) == 4  # on a new connection
