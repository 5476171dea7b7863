"""Binary frames over HTTP: negotiated by X-Wove-Capabilities, large buffers, payload limits."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from wove.environment import ExecutorRuntime
from wove.errors import EnvironmentExecutionError, PayloadTooLargeError
from wove.framing import FrameSplitter
from wove.options import DEFAULT_MAX_MESSAGE_BYTES
from wove.protocol import (
    BINARY_MAGIC,
    CAPABILITY_BINARY_FRAMES,
    decode_command,
    decode_events,
    encode_event,
    encode_frame,
    is_binary,
)
from wove.testing import tasks
from wove_executor_http import HttpEnvironmentExecutor
from wove_executor_http.executor import FRAMES, HTTP_OPTIONS
from wove_executor_http.plugin import serve_in_background
from wove_executor_http.server import DEFAULT_MAX_BODY_BYTES, create_app

from .conftest import Worker, serve_asgi

pytestmark = pytest.mark.integration

Message = MutableMapping[str, Any]
App = Callable[[MutableMapping[str, Any], Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
               Awaitable[None]]


def _env(url: str, **config: Any) -> dict[str, Any]:
    return {"w": {"executor": "http", "executor_config": {"url": url, **config}}}


def _buffers() -> dict[str, Any]:
    """Large buffers (over the 16 KiB out-of-band threshold) of each kind, nested; one over
    256 KiB, so an unsigned request writes its parts without joining them."""
    return {
        "bytes": b"\x00\x01" * 12_000,
        "bytearray": bytearray(b"b" * 40_000),
        "memoryview": memoryview(b"m" * 17_000),
        "large": bytes(range(256)) * 1200,
        "nested": [(b"t" * 20_000, {"inner": [bytearray(b"i" * 30_000), memoryview(b"v" * 33_000)]}), b"small", 3],
    }


@pytest.mark.parametrize("mode", ["plain", "streamed", "signed", "httpx-transport"])
async def test_buffers_round_trip(mode: str, worker: Worker, signed_worker: Worker, secret_env: str) -> None:
    value = _buffers()
    if mode == "signed":
        definition = _env(signed_worker.url, security=f"env:{secret_env}")
    elif mode == "httpx-transport":
        definition = _env(worker.url, transport="httpx")
    else:
        definition = _env(worker.url)
    async with ExecutorRuntime(definition, {}) as runtime:
        heartbeat = {"delivery_heartbeat_seconds": 5.0} if mode == "streamed" else {}
        result = await runtime.call_with("w", tasks.echo, (value,), **heartbeat)
    assert result == value
    assert type(result["bytearray"]) is bytearray
    assert type(result["nested"][0][1]["inner"][1]) is memoryview


async def test_a_numpy_array_round_trips(worker: Worker) -> None:
    numpy = pytest.importorskip("numpy")
    array = numpy.arange(50_000, dtype=numpy.float64).reshape(250, 200)
    async with ExecutorRuntime(_env(worker.url), {}) as runtime:
        result = await runtime.call("w", tasks.echo, {"array": array, "column": array[:, 3]})
    assert numpy.array_equal(result["array"], array) and numpy.array_equal(result["column"], array[:, 3])


async def test_the_executor_learns_binary_frames_from_the_worker(worker: Worker) -> None:
    for binary_frames in (True, False):
        executor = HttpEnvironmentExecutor()
        await executor.start(environment_name="e", run_config={},
                             environment_config={"url": worker.url, "binary_frames": binary_frames})
        try:
            assert executor.capabilities == frozenset()  # nothing is known before the worker is asked
            capabilities = await executor.negotiate_capabilities()
            assert (CAPABILITY_BINARY_FRAMES in capabilities) is binary_frames
            assert "task_yield" in capabilities
        finally:
            await executor.stop()


class Spy:
    """Wraps an ASGI app; records what each POST sent and what it got back."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.posts: list[dict[str, Any]] = []

    async def __call__(self, scope: MutableMapping[str, Any], receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        record: dict[str, Any] = {"content_type": headers.get("content-type"), "accept": headers.get("accept"),
                                  "body": b"", "answer": b""}
        self.posts.append(record)

        async def spy_receive() -> Message:
            message = await receive()
            record["body"] += message.get("body", b"")
            return message

        async def spy_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                record["answer_type"] = dict(message["headers"]).get(b"content-type", b"").decode()
            elif message["type"] == "http.response.body":
                record["answer"] += message.get("body", b"")
            await send(message)

        await self.app(scope, spy_receive, spy_send)


@asynccontextmanager
async def spied(app: App) -> AsyncIterator[tuple[str, Spy]]:
    spy = Spy(app)
    async with serve_asgi(spy) as port:
        yield f"http://127.0.0.1:{port}/wove", spy


@pytest.mark.parametrize("binary_frames", [True, False])
@pytest.mark.parametrize("streamed", [False, True], ids=["plain", "streamed"])
async def test_the_wire_carries_binary_frames_between_ours_and_json_when_off(binary_frames: bool,
                                                                               streamed: bool) -> None:
    value = b"w" * 50_000
    heartbeat = {"delivery_heartbeat_seconds": 5.0} if streamed else {}
    async with spied(create_app()) as (url, spy), ExecutorRuntime(_env(url, binary_frames=binary_frames)) as runtime:
        assert await runtime.call_with("w", tasks.echo, (value,), **heartbeat) == value
    [post] = spy.posts
    if binary_frames:
        assert post["content_type"] == FRAMES and FRAMES in post["accept"]
        assert is_binary(post["body"]) and post["answer_type"] == FRAMES
        # the bulky result is a binary frame (streamed: after the task_started JSON line)
        assert is_binary(post["answer"]) if not streamed else b"\n" + BINARY_MAGIC in post["answer"]
        assert value in post["body"] and value in post["answer"]  # the buffer travels as it is, not base64
    else:
        assert post["content_type"] == "application/json" and FRAMES not in post["accept"]
        assert post["body"].startswith(b"{") and post["answer_type"] != FRAMES
        assert not is_binary(post["answer"])
    assert ("application/x-ndjson" in post["accept"]) is streamed
    assert _events(post["answer"])[-1]["result"] == value


def _events(answer: bytes) -> list[dict[str, Any]]:
    """The events of a whole answer: one body, NDJSON lines or binary frames."""
    if not answer.startswith(b"{\"type\"") and not is_binary(answer):
        return decode_events(answer)
    messages: list[bytes | bytearray] = []
    splitter = FrameSplitter(messages.append, pytest.fail)
    splitter.feed(answer)
    splitter.close()
    return [event for message in messages if message.strip() for event in decode_events(message)]


async def test_a_wove2_style_worker_gets_json_frames() -> None:
    """A worker that announces nothing (Wove 2.x) gets JSON bodies and answers JSON."""

    async def wove2(scope: MutableMapping[str, Any], receive: Callable[[], Awaitable[Message]],
                    send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        answer = b'{"error": "not found"}'
        if scope["method"] == "POST":
            frame = decode_command(json.loads(body))  # JSON, or this fails
            result = frame["callable"](**frame["args"])
            event = {"type": "task_result", "run_id": frame["run_id"], "task_id": frame["task_id"], "result": result}
            answer = b'{"events": [' + encode_event(event) + b"]}"
        await send({"type": "http.response.start", "status": 200 if scope["method"] == "POST" else 404,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": answer})

    async with spied(wove2) as (url, spy), ExecutorRuntime(_env(url), {}) as runtime:
        assert await runtime.call("w", tasks.add, b"a" * 20_000, b"b") == b"a" * 20_000 + b"b"
        assert await runtime.call("w", tasks.add, 1, 2) == 3
    assert [post["content_type"] for post in spy.posts] == ["application/json"] * 2
    assert all(post["body"].startswith(b"{") and FRAMES not in post["accept"] for post in spy.posts)


def _run_frame(value: Any, **delivery: Any) -> dict[str, Any]:
    return {"type": "run_task", "run_id": "echo:raw1", "task_id": "echo", "callable": tasks.echo,
            "args": {"value": value}, "delivery": delivery}


@pytest.mark.parametrize(("body", "accept", "answer"), [
    ("binary", f"{FRAMES}, application/json", FRAMES),
    ("binary", "application/json", "application/json"),  # it does not say it reads them: JSON
    ("json", f"{FRAMES}, application/json", FRAMES),  # it reads them: a bulky result comes in frames
    ("json", "application/json", "application/json"),  # a JSON request that reads JSON: JSON, as ever
])
async def test_the_worker_answers_a_hand_made_binary_frame_in_binary(worker: Worker, body: str, accept: str,
                                                                     answer: str) -> None:
    value = {"data": b"r" * 70_000, "text": "é"}
    frame = _run_frame(value)
    content = encode_frame(frame, binary=body == "binary")
    async with httpx.AsyncClient(timeout=20) as client:
        response = await client.post(worker.url, content=content, headers={
            "Content-Type": FRAMES if body == "binary" else "application/json", "Accept": accept})
    assert response.status_code == 200 and response.headers["content-type"] == answer
    assert is_binary(response.content) is (answer == FRAMES)
    if answer != FRAMES:
        assert response.json()["events"][-1]["type"] == "task_result"
    event = decode_events(response.content)[-1]
    assert event["type"] == "task_result" and event["result"] == value


async def test_a_streamed_answer_to_a_frames_reader_comes_as_it_happens(worker: Worker) -> None:
    """Content type x-wove-frames: small events stay JSON lines (worth_binary), in order."""
    frame = {"type": "run_task", "run_id": "sleep:raw2", "task_id": "sleep", "callable": tasks.sleep,
             "args": {"seconds": 0.6}, "delivery": {"delivery_heartbeat_seconds": 0.3}}
    messages: list[Any] = []
    splitter = FrameSplitter(messages.append, pytest.fail)
    headers = {"Content-Type": FRAMES, "Accept": f"{FRAMES}, application/x-ndjson"}
    async with httpx.AsyncClient(timeout=20) as client, client.stream(
            "POST", worker.url, content=encode_frame(frame, binary=True), headers=headers) as response:
        assert response.headers["content-type"] == FRAMES
        async for chunk in response.aiter_raw():
            splitter.feed(chunk)
    splitter.close()
    assert messages and not any(is_binary(message) for message in messages)
    events = [event for message in messages if message.strip() for event in decode_events(message)]
    assert events[0]["type"] == "task_started" and events[-1]["type"] == "task_result"
    assert events[-1]["result"] == "slept"


@pytest.mark.timeout(120)
async def test_a_100_mib_argument_comes_back_as_a_100_mib_result(worker: Worker) -> None:
    data = bytes(range(256)) * (100 * 1024 * 4)  # 100 MiB
    async with ExecutorRuntime(_env(worker.url, payload_warning_bytes=False), {}) as runtime:
        result = await runtime.call("w", tasks.echo, data)
    assert len(result) == len(data) and result == data


def test_the_default_limits_match() -> None:
    assert DEFAULT_MAX_BODY_BYTES == DEFAULT_MAX_MESSAGE_BYTES >= 256 * 1024 * 1024
    config = HTTP_OPTIONS.validate({"url": "http://127.0.0.1:1/wove"}, environment="e")
    assert config["max_message_bytes"] == DEFAULT_MAX_BODY_BYTES and config["binary_frames"] is True


@pytest.mark.parametrize("binary_frames", [True, False])
async def test_max_message_bytes_refuses_a_large_command_before_sending(binary_frames: bool,
                                                                        tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    async with spied(create_app()) as (url, spy):
        definition = _env(url, max_message_bytes=1_000_000, binary_frames=binary_frames)
        async with ExecutorRuntime(definition, {}) as runtime:
            with pytest.raises(PayloadTooLargeError) as info:
                await runtime.call("w", tasks.record, str(marker), 0.0, "x" * 2_000_000)
            assert await runtime.call("w", tasks.add, 1, 2) == 3  # the executor still works
    error = info.value
    assert error.limit == 1_000_000 and error.size > 2_000_000
    assert error.setting == "executor_config.max_message_bytes"
    message = str(error)
    assert "executor_config.max_message_bytes" in message and f"({error.size} bytes)" in message
    assert "'record'" in message
    assert not marker.exists()
    assert len(spy.posts) == 1  # only the add: the record never left the client


async def test_the_worker_body_limit_still_answers_413() -> None:
    async with serve_in_background(create_app(max_body_bytes=1_000_000)) as url, ExecutorRuntime(_env(url)) as runtime:
        with pytest.raises(EnvironmentExecutionError) as info:
            await runtime.call("w", tasks.echo, b"x" * 2_000_000)
    message = str(info.value)
    assert "HTTP 413" in message and "--max-body-bytes" in message, message


async def test_payload_warning_bytes_warns_once_naming_task_and_size(worker: Worker, tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="wove.transport")
    async with ExecutorRuntime(_env(worker.url, payload_warning_bytes=100_000), {}) as runtime:
        await runtime.call("w", tasks.record, str(tmp_path / "ran"), 0.0, "p" * 200_000)
        sent = [r.getMessage() for r in caplog.records if "payload_warning_bytes" in r.getMessage()]
        caplog.clear()
        assert len(await runtime.call("w", tasks.blob, 300_000)) == 300_000
        received = [r.getMessage() for r in caplog.records if "payload_warning_bytes" in r.getMessage()]
    assert len(sent) == 1, sent
    assert "task 'record'" in sent[0] and re.search(r"moves arguments of 19\d\.\d KiB \(\d+ bytes\)", sent[0])
    assert len(received) == 1, received
    assert "task 'blob'" in received[0] and re.search(r"moves result of 29\d\.\d KiB \(\d+ bytes\)", received[0])


async def test_a_health_check_that_never_answers_does_not_hold_the_runs() -> None:
    """The probe before the first run waits connect_timeout at most; then the run goes as JSON."""
    app = create_app()
    silent = asyncio.Event()

    async def no_health(scope: MutableMapping[str, Any], receive: Callable[[], Awaitable[Message]],
                        send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            await silent.wait()  # never answers
            return
        await app(scope, receive, send)

    async with spied(no_health) as (url, spy), ExecutorRuntime(_env(url, connect_timeout=0.5)) as runtime:
        assert await runtime.call("w", tasks.add, 1, 2) == 3
        assert await runtime.call("w", tasks.echo, b"z" * 20_000) == b"z" * 20_000  # learnt from the answer
        silent.set()
    assert [post["content_type"] for post in spy.posts] == ["application/json", FRAMES]
