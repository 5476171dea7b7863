"""Streamed results over gRPC: only on a Session whose confirmation announces task_yield."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest

from wove.environment import ExecutorRuntime
from wove.errors import StreamNotSupportedError
from wove.protocol import decode_command, encode_event
from wove.testing import tasks
from wove.worker import WorkerEngine

pytestmark = pytest.mark.integration

SERVICE = "wove.network_executor.WorkerService"


@pytest.fixture
async def send_only_server() -> AsyncIterator[tuple[str, Counter[str]]]:
    """A Wove 2.x-style server: unary ``Send`` only (no Session, no capabilities)."""
    commands: Counter[str] = Counter()
    engine = WorkerEngine(name="v2")

    async def send(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        frame = decode_command(request)
        commands[frame["type"]] += 1
        events: list[bytes] = []
        if frame["type"] == "run_task":
            result = frame["callable"](**frame["args"])
            events.append(encode_event({"type": "task_result", "run_id": frame["run_id"],
                                        "task_id": frame["task_id"], "result": result}))
        return b'{"events":[' + b",".join(events) + b"]}"

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        SERVICE, {"Send": grpc.unary_unary_rpc_method_handler(send)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}", commands
    await engine.aclose()
    await server.stop(None)


async def test_a_wove2_style_server_gets_no_streamed_run(send_only_server: tuple[str, Counter[str]]) -> None:
    target, commands = send_only_server
    async with ExecutorRuntime({"w": {"executor": "grpc", "executor_config": {"target": target}}}) as runtime:
        stream = runtime.stream("w", tasks.count_up, 3, "/nonexistent")
        with pytest.raises(StreamNotSupportedError, match="does not support streamed results") as caught:
            async for _item in stream:
                pass
        assert "task_yield" in str(caught.value)
        assert await runtime.call("w", tasks.add, 2, 3) == 5
    assert commands == Counter({"run_task": 1}), commands  # the streamed run was never sent


async def test_the_session_confirmation_announces_task_yield(grpc_worker: Any) -> None:
    async with grpc.aio.insecure_channel(grpc_worker.target) as channel:
        call = channel.stream_stream(f"/{SERVICE}/Session")()
        metadata = await call.initial_metadata()
        assert metadata.get("wove-session") == "1"
        assert "task_yield" in str(metadata.get("wove-capabilities")).split(", ")
        call.cancel()


async def test_a_run_over_send_only_refuses_streaming(grpc_worker: Any) -> None:
    config = {"target": grpc_worker.target, "streaming": False}
    async with ExecutorRuntime({"w": {"executor": "grpc", "executor_config": config}}) as runtime:
        with pytest.raises(StreamNotSupportedError, match="Session method"):
            await runtime.stream("w", tasks.count_up, 3, "/nonexistent").start()
