"""The executor against gRPC servers that are not ours: a Wove 2.x-style server (``Send`` only).

The server here is written from the wire format alone: a grpc.aio generic handler for
``/wove.network_executor.WorkerService/Send`` that decodes the command with wove's public
codec and runs it on a :class:`wove.worker.WorkerEngine`. It has no ``Session`` and no
``Stream``: the executor's ``Session`` attempt must fall back to per-run calls every time
(never ``INTERNAL: Internal error from Core``), and no run may execute twice.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import pytest

from wove.environment import ExecutorRuntime
from wove.errors import EnvironmentExecutionError
from wove.protocol import TERMINAL_EVENTS, decode_command, encode_event
from wove.worker import WorkerEngine

pytestmark = pytest.mark.integration

SERVICE = "wove.network_executor.WorkerService"
SEND = f"/{SERVICE}/Send"
SESSION = f"/{SERVICE}/Session"
STREAM = f"/{SERVICE}/Stream"
BIG = 64 * 1024 * 1024


@dataclass
class ForeignServer:
    target: str
    runs: Counter[str] = field(default_factory=Counter)  #: Send calls per run_id
    methods: Counter[str] = field(default_factory=Counter)  #: every call, by method path


class Recorder(grpc.aio.ServerInterceptor):
    def __init__(self, methods: Counter[str]) -> None:
        self.methods = methods

    async def intercept_service(self, continuation: Callable[..., Any], details: Any) -> Any:
        self.methods[details.method] += 1
        return await continuation(details)


def v2_send(engine: WorkerEngine, runs: Counter[str]) -> Callable[..., Any]:
    async def send(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        frame = decode_command(request)
        if frame["type"] != "run_task":
            return b'{"events":[]}'
        runs[frame["run_id"]] += 1
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

    return send


async def start_foreign(methods: dict[str, Callable[[WorkerEngine, Counter[str]], grpc.RpcMethodHandler]]
                        ) -> tuple[grpc.aio.Server, WorkerEngine, ForeignServer]:
    engine = WorkerEngine(name="foreign")
    record = ForeignServer(target="")
    server = grpc.aio.server(interceptors=[Recorder(record.methods)],
                             options=[("grpc.max_receive_message_length", BIG),
                                      ("grpc.max_send_message_length", BIG)])
    handlers = {name: make(engine, record.runs) for name, make in methods.items()}
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    record.target = f"127.0.0.1:{port}"
    return server, engine, record


@pytest.fixture
async def v2_server() -> AsyncIterator[ForeignServer]:
    server, engine, record = await start_foreign(
        {"Send": lambda engine, runs: grpc.unary_unary_rpc_method_handler(v2_send(engine, runs))})
    yield record
    await engine.aclose()
    await server.stop(None)


def runtime_for(target: str, **config: Any) -> ExecutorRuntime:
    return ExecutorRuntime({"w": {"executor": "grpc", "executor_config": {"target": target, **config}}}, {})


async def scenario(target: str, kind: str, size: int) -> list[Any]:
    """One fresh environment (a fresh Session attempt) running one mix of runs."""
    payload = b"p" * size
    async with runtime_for(target) as runtime:
        if kind == "sequential":
            return [await runtime.call("w", len, payload + b"x" * i) for i in range(5)]
        if kind == "concurrent":
            return list(await asyncio.gather(*(runtime.call("w", len, payload + b"x" * i) for i in range(40))))
        if kind == "heartbeat":  # Stream first (also UNIMPLEMENTED), then Send
            return list(await asyncio.gather(*(
                runtime.call_with("w", len, (payload + b"x" * i,), delivery_heartbeat_seconds=5) for i in range(20))))
        # mixed: heartbeat and plain runs at once
        return list(await asyncio.gather(*(
            runtime.call_with("w", len, (payload + b"x" * i,),
                              **({"delivery_heartbeat_seconds": 5} if i % 2 else {})) for i in range(30))))


EXPECTED = {"sequential": 5, "concurrent": 40, "heartbeat": 20, "mixed": 30}


async def test_every_scenario_falls_back_to_send(v2_server: ForeignServer) -> None:
    failures: list[str] = []
    scenarios = [(kind, size) for size in (0, 200_000, 2_000_000) for kind in EXPECTED]  # 12 sequential
    for kind, size in scenarios:
        try:
            results = await asyncio.wait_for(scenario(v2_server.target, kind, size), 30)
        except EnvironmentExecutionError as exc:
            failures.append(f"{kind}/{size}: {exc}")
            continue
        assert results == [size + i for i in range(EXPECTED[kind])], (kind, size)
    # and several environments opening their Session at the same moment
    together = [("concurrent", 200_000), ("mixed", 0), ("heartbeat", 2_000_000), ("concurrent", 2_000_000)]
    outcomes = await asyncio.wait_for(asyncio.gather(
        *(scenario(v2_server.target, kind, size) for kind, size in together), return_exceptions=True), 60)
    for (kind, size), outcome in zip(together, outcomes):
        if isinstance(outcome, BaseException):
            failures.append(f"{kind}/{size} (concurrent environments): {outcome!r}")
        else:
            assert outcome == [size + i for i in range(EXPECTED[kind])], (kind, size)
    assert not failures, f"{len(failures)} of {len(scenarios) + len(together)} scenarios failed:\n" + "\n".join(failures)
    assert v2_server.methods[SESSION] >= len(scenarios), "every environment tried Session first"
    assert v2_server.methods[STREAM] >= 1, "heartbeat runs tried Stream first"
    executed_twice = {run: n for run, n in v2_server.runs.items() if n != 1}
    assert not executed_twice, f"runs sent more than once: {executed_twice}"


async def test_a_session_that_was_confirmed_does_not_fall_back() -> None:
    # A server that serves Session (confirms it), then fails with INTERNAL: the runs it
    # may have started must fail, not be sent again through Send.
    def session(engine: WorkerEngine, runs: Counter[str]) -> grpc.RpcMethodHandler:
        async def handler(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            await context.send_initial_metadata((("wove-session", "1"),))
            async for _message in requests:
                runs["session-command"] += 1
                await context.abort(grpc.StatusCode.INTERNAL, "the session broke")
            yield b""  # pragma: no cover - makes this an async generator

        return grpc.stream_stream_rpc_method_handler(handler)

    server, engine, record = await start_foreign(
        {"Send": lambda engine, runs: grpc.unary_unary_rpc_method_handler(v2_send(engine, runs)),
         "Session": session})
    try:
        async with runtime_for(record.target) as runtime:
            with pytest.raises(EnvironmentExecutionError, match="INTERNAL") as info:
                await asyncio.wait_for(runtime.call("w", len, b"abc"), 20)
        assert "the session broke" in str(info.value)
        assert record.runs["session-command"] == 1
        assert record.methods[SEND] == 0, "a run the server may have started was sent again"
    finally:
        await engine.aclose()
        await server.stop(None)


async def test_session_only_does_not_fall_back(v2_server: ForeignServer) -> None:
    async with runtime_for(v2_server.target, streaming="session") as runtime:
        with pytest.raises(EnvironmentExecutionError, match="UNIMPLEMENTED") as info:
            await asyncio.wait_for(runtime.call("w", len, b"abc"), 20)
    assert "session_method" in str(info.value)
    assert v2_server.methods[SEND] == 0
