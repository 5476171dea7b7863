"""Streamed results over WebSocket: negotiated by the handshake's X-Wove-Capabilities."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.server import serve

from wove.environment import ExecutorRuntime
from wove.errors import StreamNotSupportedError
from wove.protocol import decode_command, encode_event
from wove.testing import tasks


@pytest.fixture
async def wove2_style_worker() -> AsyncIterator[str]:
    """A WebSocket peer that speaks the Wove 2.x frames and announces no capability."""
    received: list[str] = []

    async def handle(ws: Any) -> None:
        async for message in ws:
            frame = decode_command(message)
            received.append(frame["type"])
            if frame["type"] == "run_task":
                result = frame["callable"](**frame["args"])
                await ws.send(encode_event({"type": "task_result", "run_id": frame["run_id"],
                                            "task_id": frame["task_id"], "result": result}).decode())

    async with serve(handle, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}/"
    assert "stream_credit" not in received and received.count("run_task") == 1, received


async def test_a_peer_that_does_not_announce_gets_no_streamed_run(wove2_style_worker: str) -> None:
    definition = {"executor": "websocket", "executor_config": {"url": wove2_style_worker}}
    async with ExecutorRuntime({"w": definition}) as runtime:
        with pytest.raises(StreamNotSupportedError, match="does not support streamed results"):
            runtime.stream("w", tasks.count_up, 3, "/nonexistent")
        assert await runtime.call("w", tasks.add, 2, 3) == 5


async def test_the_worker_announces_task_yield_on_the_handshake(shared_worker: Any) -> None:
    from websockets.asyncio.client import connect

    async with connect(shared_worker.url) as ws:
        assert ws.response is not None
        assert "task_yield" in ws.response.headers["X-Wove-Capabilities"].split(", ")
        await ws.send(json.dumps({"type": "stream_credit", "run_id": "x:1", "task_id": "x", "credit": 3}))
        await ws.send(json.dumps({"type": "stream_credit", "run_id": "x:2", "task_id": "x", "credit": 0}))
        answer = json.loads(await ws.recv())  # a credit for no run is ignored; a bad one is answered
        assert answer["type"] == "task_error" and "positive integer 'credit'" in answer["error"]["message"]
