"""``executor_config.unary_client``: the native HTTP/2 client of the Send calls and grpcio.

Real servers on 127.0.0.1 (the project's worker service, ``streaming: false``); every case runs
with both clients and must read the same: results, the worker's errors, limits, deadlines,
signed metadata, GOAWAY when the server stops.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from wove.environment import ExecutorRuntime
from wove.errors import ConfigError, EnvironmentExecutionError
from wove_executor_grpc.server import GrpcWorkerServer, start_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

CLIENTS = ["native", "grpcio"]
SECRET = "native-unary-secret"


def echo(value: Any) -> Any:
    return value


def fail(text: str) -> None:
    raise ValueError(text)


def snooze(seconds: float) -> str:
    import time

    time.sleep(seconds)
    return "woke"


@pytest.fixture
async def server() -> AsyncIterator[GrpcWorkerServer]:
    running = await start_server()
    yield running
    await running.stop(0.5)


def runtime(target: str, client: str, **config: Any) -> ExecutorRuntime:
    executor_config = {"target": target, "streaming": False, "unary_client": client, **config}
    return ExecutorRuntime({"w": {"executor": "grpc", "executor_config": executor_config}}, {})


@pytest.mark.parametrize("client", CLIENTS)
async def test_results_and_many_in_flight(server: GrpcWorkerServer, client: str) -> None:
    async with runtime(server.target, client) as rt:
        results = await asyncio.wait_for(asyncio.gather(*(rt.call_with("w", echo, (i,)) for i in range(300))), 30)
    assert results == list(range(300))


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_large_argument_and_result(server: GrpcWorkerServer, client: str) -> None:
    big = b"x" * (40 * 1024 * 1024)  # far over every HTTP/2 window: flow control both ways
    async with runtime(server.target, client) as rt:
        assert await asyncio.wait_for(rt.call_with("w", echo, (big,)), 50) == big


@pytest.mark.parametrize("client", CLIENTS)
async def test_the_workers_error(server: GrpcWorkerServer, client: str) -> None:
    async with runtime(server.target, client) as rt:
        with pytest.raises(Exception, match="boom"):
            await asyncio.wait_for(rt.call_with("w", fail, ("boom",)), 20)


@pytest.mark.parametrize("client", CLIENTS)
async def test_unimplemented_method(server: GrpcWorkerServer, client: str) -> None:
    async with runtime(server.target, client, method="/no.Such/Method") as rt:
        with pytest.raises(EnvironmentExecutionError, match="UNIMPLEMENTED") as info:
            await asyncio.wait_for(rt.call_with("w", echo, (1,)), 20)
    assert "executor_config.method" in str(info.value)


@pytest.mark.parametrize("client", CLIENTS)
async def test_deadline(server: GrpcWorkerServer, client: str) -> None:
    async with runtime(server.target, client, timeout=0.5, max_deliveries=1) as rt:
        with pytest.raises(EnvironmentExecutionError, match="DEADLINE_EXCEEDED"):
            await asyncio.wait_for(rt.call_with("w", snooze, (5,)), 20)


@pytest.mark.parametrize("client", CLIENTS)
async def test_the_message_limit(server: GrpcWorkerServer, client: str) -> None:
    async with runtime(server.target, client, max_message_bytes=100_000) as rt:
        with pytest.raises(Exception, match="max_message_bytes"):
            await asyncio.wait_for(rt.call_with("w", echo, (b"y" * 200_000,)), 20)


@pytest.mark.parametrize("client", CLIENTS)
async def test_signed_metadata(client: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WOVE_NATIVE_TEST_SECRET", SECRET)
    running = await start_server(security={"type": "signed", "secret": SECRET})
    try:
        async with runtime(running.target, client, security="env:WOVE_NATIVE_TEST_SECRET") as rt:
            assert await asyncio.wait_for(rt.call_with("w", echo, ("signed",)), 20) == "signed"
        async with runtime(running.target, client, max_deliveries=1) as rt:
            with pytest.raises(EnvironmentExecutionError, match=r"UNAUTHENTICATED|PERMISSION_DENIED"):
                await asyncio.wait_for(rt.call_with("w", echo, ("unsigned",)), 20)
    finally:
        await running.stop(0.5)


@pytest.mark.parametrize("client", CLIENTS)
async def test_connection_refused(client: str) -> None:
    running = await start_server()
    target = running.target
    await running.stop(0)
    async with runtime(target, client, max_deliveries=1, reconnect_timeout=0.5) as rt:
        with pytest.raises(EnvironmentExecutionError, match="Is the worker service running"):
            await asyncio.wait_for(rt.call_with("w", echo, (1,)), 20)


@pytest.mark.parametrize("client", CLIENTS)
async def test_the_server_stops_between_calls(client: str) -> None:
    """The server stops (GOAWAY on the idle connection): the next run fails as a transport error."""
    running = await start_server()
    async with runtime(running.target, client, max_deliveries=1, reconnect_timeout=0.5) as rt:
        assert await asyncio.wait_for(rt.call_with("w", echo, (1,)), 20) == 1
        await running.stop(0)
        with pytest.raises(EnvironmentExecutionError) as info:
            await asyncio.wait_for(rt.call_with("w", echo, (2,)), 20)
    assert info.value.payload["source"] == "transport"


async def test_native_refuses_what_it_cannot_serve() -> None:
    config = {"target": "127.0.0.1:1", "streaming": False, "unary_client": "native",
              "options": {"grpc.keepalive_time_ms": 10000}}
    with pytest.raises(ConfigError, match="unary_client"):
        async with ExecutorRuntime({"w": {"executor": "grpc", "executor_config": config}}, {}) as rt:
            await rt.call_with("w", echo, (1,))
