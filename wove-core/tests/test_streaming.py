"""Streamed results in the core: codec, engine, runtime.stream and Client.stream."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from wove.environment import Client, ExecutorRuntime, LocalEnvironmentExecutor
from wove.errors import ConfigError, DeliveryTimeoutError, ProtocolError, StreamNotSupportedError
from wove.protocol import decode_command, decode_events, encode_event, encode_frame
from wove.session import WorkerService
from wove.testing import tasks
from wove.worker import WorkerEngine


class Wove2LikeExecutor(LocalEnvironmentExecutor):
    """An in-process executor that announces no capability (as a Wove 2.x peer)."""

    capabilities: frozenset[str] = frozenset()


def test_codec_round_trips_task_yield_and_stream_credit() -> None:
    data = encode_event({"type": "task_yield", "run_id": "g:1", "task_id": "g", "seq": 3, "item": {"x": [1, 2]}})
    assert b"item_pickle" in data and b'"seq":3' in data
    [event] = decode_events(data)
    assert event == {"type": "task_yield", "run_id": "g:1", "task_id": "g", "seq": 3, "item": {"x": [1, 2]}}
    credit = decode_command(encode_frame({"type": "stream_credit", "run_id": "g:1", "task_id": "g", "credit": 8}))
    assert credit["credit"] == 8
    for bad in (0, -1, "8", True, None):
        with pytest.raises(ProtocolError, match="positive integer 'credit'"):
            decode_command({"type": "stream_credit", "run_id": "g:1", "task_id": "g", "credit": bad})


def test_an_item_that_does_not_pickle_ends_the_stream_with_an_error() -> None:
    data = encode_event({"type": "task_yield", "run_id": "g:1", "task_id": "g", "seq": 2,
                         "item": threading.Lock()})
    [event] = decode_events(data)
    assert event["type"] == "task_error"
    assert "Item 2 of the streamed run g:1 cannot be sent back" in event["error"]["message"]


async def test_engine_pulls_only_with_credit(tmp_path: Path) -> None:
    engine = WorkerEngine(name="t")
    events: list[dict[str, Any]] = []
    counter = tmp_path / "n"
    frame = {"type": "run_task", "run_id": "c:1", "task_id": "c", "callable": tasks.count_up,
             "args": {"n": 10, "counter": str(counter)}, "delivery": {"delivery_stream_window": 3}}
    await engine.submit(frame, events.append)
    for _ in range(500):
        if sum(e["type"] == "task_yield" for e in events) >= 3:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    assert [e["seq"] for e in events if e["type"] == "task_yield"] == [0, 1, 2]
    assert counter.read_text() == "3"  # waiting for credit, not running ahead
    assert engine.grant("c:1", 8)  # the last pull (which finds the end) needs credit too
    assert not engine.grant("unknown:1", 1)
    for _ in range(500):
        if events[-1]["type"] == "task_result":
            break
        await asyncio.sleep(0.01)
    assert [e["item"] for e in events if e["type"] == "task_yield"] == list(range(10))
    assert events[-1] == {"type": "task_result", "run_id": "c:1", "task_id": "c", "result": None}
    await engine.aclose()


async def test_a_session_passes_stream_credit_to_the_engine(tmp_path: Path) -> None:
    service = WorkerService(name="t")
    session = service.session("test")
    counter = tmp_path / "n"
    run = encode_frame({"type": "run_task", "run_id": "c:2", "task_id": "c", "callable": tasks.acount_up,
                        "args": {"n": 4, "counter": str(counter)}, "delivery": {"delivery_stream_window": 1}})
    await session.receive(run)
    seen: list[dict[str, Any]] = []
    while not any(e["type"] == "task_yield" for e in seen):
        await session.wait()
        seen += session.take_events()
    await session.receive(b'{"type": "stream_credit", "run_id": "c:2", "task_id": "c", "credit": 4}')
    while seen[-1]["type"] != "task_result":
        await session.wait()
        seen += session.take_events()
    assert [e["item"] for e in seen if e["type"] == "task_yield"] == [0, 1, 2, 3]
    assert service.health()["capabilities"] == ["binary_frames", "task_yield"]
    await service.shutdown()


async def test_runtime_stream_refuses_a_peer_without_the_capability() -> None:
    async with ExecutorRuntime({"old": {"executor": Wove2LikeExecutor()}}) as runtime:
        with pytest.raises(StreamNotSupportedError) as caught:
            runtime.stream("old", tasks.count_up, 3, "/nonexistent")
        message = str(caught.value)
        assert "Wove2LikeExecutor does not support streamed results" in message
        assert "'task_yield'" in message and "announced: none" in message and "upgrade" in message
        assert await runtime.call("old", tasks.add, 1, 2) == 3


async def test_stream_window_must_be_a_positive_integer() -> None:
    async with ExecutorRuntime({"local": {"executor": "local"}}, {"delivery_stream_window": "lots"}) as runtime:
        with pytest.raises(ConfigError, match=r"delivery_stream_window must be a positive integer .*got 'lots'"):
            runtime.stream("local", tasks.count_up, 3, "/nonexistent")
    with pytest.raises(ConfigError, match="delivery_stream_window"):
        async with ExecutorRuntime({"local": {"executor": "local", "delivery_stream_window": 0}}):
            pass


async def test_a_non_generator_task_is_a_clear_error() -> None:
    async with ExecutorRuntime({"local": {"executor": "local"}}) as runtime:
        with pytest.raises(TypeError, match="needs a generator or async generator function; add returned int"):
            async for _item in runtime.stream("local", tasks.add, 1, 2):
                pass


async def test_cancelling_the_consumer_closes_the_generator(tmp_path: Path) -> None:
    marker = tmp_path / "closed"
    async with ExecutorRuntime({"local": {"executor": "local"}}) as runtime:
        first = asyncio.Event()

        async def consume() -> None:
            async for _item in runtime.stream("local", tasks.stream_until_released, str(tmp_path / "never")):
                first.set()

        task = asyncio.ensure_future(consume())
        await first.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        stream = runtime.stream("local", tasks.acount_up, 100, str(tmp_path / "n"), str(marker))
        async with stream:
            assert await stream.__anext__() == 0
        for _ in range(500):
            if marker.exists():
                break
            await asyncio.sleep(0.01)
        assert marker.read_text() == "closed"
        assert await runtime.call("local", tasks.add, 1, 1) == 2


@pytest.mark.parametrize("executor", ["local", "stdio"])
def test_client_stream_is_a_plain_iterator(executor: str, tmp_path: Path) -> None:
    marker = tmp_path / "closed"
    with Client({"w": {"executor": executor}}) as client:
        assert list(client.stream("w", tasks.count_up, 5, str(tmp_path / "a"))) == [0, 1, 2, 3, 4]
        items = client.stream("w", tasks.count_up, 10_000, str(tmp_path / "b"), str(marker))
        assert [next(items), next(items)] == [0, 1]
        del items  # dropping the iterator cancels the run; the generator's finally runs
        for _ in range(1000):
            if marker.exists():
                break
            threading.Event().wait(0.01)
        assert marker.read_text() == "closed"
        with pytest.raises(tasks.ContractTaskError, match="two then"):
            list(client.stream("w", tasks.yield_then_fail, 2, "two then"))


def test_client_stream_refuses_at_the_call() -> None:
    with Client({"old": {"executor": Wove2LikeExecutor()}}) as client, \
            pytest.raises(StreamNotSupportedError, match="does not support streamed results"):
        client.stream("old", tasks.count_up, 3, "/nonexistent")


async def test_an_exception_in_the_loop_body_closes_the_generator(tmp_path: Path) -> None:
    marker = tmp_path / "closed"
    async with ExecutorRuntime({"local": {"executor": "local"}}) as runtime:
        with pytest.raises(KeyError, match="consumer broke"):
            async for item in runtime.stream("local", tasks.count_up, 10_000, str(tmp_path / "n"), str(marker)):
                if item == 3:
                    raise KeyError("consumer broke")
        for _ in range(500):
            if marker.exists():
                break
            await asyncio.sleep(0.01)
        assert marker.read_text() == "closed"


async def test_delivery_timeout_bounds_the_whole_stream(tmp_path: Path) -> None:
    definition = {"executor": "stdio", "delivery_timeout": 1.0}
    async with ExecutorRuntime({"w": definition}) as runtime:
        seen: list[Any] = []
        with pytest.raises(DeliveryTimeoutError, match="delivery_timeout=1s"):
            async for item in runtime.stream("w", tasks.stream_until_released, str(tmp_path / "never")):
                seen.append(item)
        assert seen == ["first"]
        assert await runtime.call("w", tasks.add, 1, 1) == 2
