"""Binary frames over the stdio pipes: negotiated by the ready line, answered in kind,
large buffers both ways, and the payload limits."""

from __future__ import annotations

import asyncio
import logging
import re
import shlex
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from wove.environment import ExecutorRuntime
from wove.errors import PayloadTooLargeError
from wove.protocol import BINARY_MAGIC, decode_events, encode_frame, parse_json
from wove_executor_stdio import STREAM_LIMIT, Oversized, StdioEnvironmentExecutor, read_frame

pytestmark = pytest.mark.integration

WORKER = [sys.executable, "-m", "wove_executor_stdio"]
KIB = 1024


def _tapped(tmp_path: Path, worker: list[str]) -> list[str]:
    """A worker command whose stdin and stdout are copied to files (``in.bin``, ``out.bin``)."""
    inbound, outbound = tmp_path / "in.bin", tmp_path / "out.bin"
    return ["sh", "-c", f"tee {shlex.quote(str(inbound))} | {shlex.join(worker)} | tee {shlex.quote(str(outbound))}"]


def _run(run_id: str, func: Any, **args: Any) -> dict[str, Any]:
    return {"type": "run_task", "run_id": run_id, "task_id": run_id.split(":")[0], "callable": func,
            "args": args, "delivery": {}}


# -- our executor and our worker -----------------------------------------------------
async def test_buffers_round_trip_through_binary_frames(tmp_path: Path) -> None:
    config = {"command": _tapped(tmp_path, WORKER), "ready_line": True}
    payload: dict[str, Any] = {
        "bytes": b"b" * (64 * KIB),
        "bytearray": bytearray(b"a" * (20 * KIB)),
        "memoryview": memoryview(b"m" * (40 * KIB)),
        "nested": {"list": [b"x" * (17 * KIB), (bytearray(b"y" * (33 * KIB)), "text", 3)], "small": b"s"},
    }
    async with ExecutorRuntime({"w": {"executor": "stdio", "executor_config": config}}) as runtime:
        echoed = await runtime.call("w", lambda value: value, payload)
        assert echoed["bytes"] == payload["bytes"]
        assert type(echoed["bytearray"]) is bytearray and echoed["bytearray"] == payload["bytearray"]
        assert bytes(echoed["memoryview"]) == bytes(payload["memoryview"])
        assert echoed["nested"] == payload["nested"]
        # the worker's stdout mixes the JSON ready line with binary answers
        assert await runtime.call("w", lambda: sum(range(10))) == 45
    inbound, outbound = (tmp_path / "in.bin").read_bytes(), (tmp_path / "out.bin").read_bytes()
    assert BINARY_MAGIC in inbound and BINARY_MAGIC in outbound
    assert outbound.startswith(b"{")  # the ready line stays JSON: it comes before any command


async def test_the_executor_offers_binary_frames_of_our_worker() -> None:
    executor = StdioEnvironmentExecutor()
    await executor.start(environment_name="w", environment_config={}, run_config={})
    try:
        assert "binary_frames" in executor.capabilities
    finally:
        await executor.stop()


async def test_binary_frames_false_keeps_json_lines(tmp_path: Path) -> None:
    config = {"command": _tapped(tmp_path, WORKER), "ready_line": True, "binary_frames": False}
    async with ExecutorRuntime({"w": {"executor": "stdio", "executor_config": config}}) as runtime:
        big = b"j" * (64 * KIB)
        assert await runtime.call("w", lambda value: value, big) == big
    inbound, outbound = (tmp_path / "in.bin").read_bytes(), (tmp_path / "out.bin").read_bytes()
    assert b"\x00" not in inbound and b"\x00" not in outbound
    assert all(line.startswith(b"{") for line in inbound.splitlines() + outbound.splitlines() if line)


@pytest.mark.interop
async def test_a_wove2_worker_keeps_getting_json_lines(wove2_python: Path, tmp_path: Path) -> None:
    config = {"command": _tapped(tmp_path, [str(wove2_python), "-m", "wove.stdio_worker"])}
    async with ExecutorRuntime({"w": {"executor": "stdio", "executor_config": config}}) as runtime:
        big = b"2" * (64 * KIB)
        assert await runtime.call("w", lambda value: value, big) == big
    inbound, outbound = (tmp_path / "in.bin").read_bytes(), (tmp_path / "out.bin").read_bytes()
    assert b"\x00" not in inbound and b"\x00" not in outbound
    assert inbound.startswith(b"{") and outbound.startswith(b"{")


@pytest.mark.timeout(120)
async def test_a_100_mib_argument_comes_back_as_a_100_mib_result() -> None:
    data = bytes(range(256)) * (400 * KIB)  # 100 MiB, over the default payload warning: fine, only a warning
    async with ExecutorRuntime({"w": {"executor": "stdio"}}) as runtime:
        echoed = await runtime.call("w", lambda value: value, data)
        assert len(echoed) == len(data) and echoed == data


# -- limits -------------------------------------------------------------------------
async def test_a_command_over_max_message_bytes_is_refused_before_it_is_sent(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    def touch(path: str, data: bytes) -> int:
        Path(path).write_text("ran")
        return len(data)

    config = {"max_message_bytes": 1_000_000}
    async with ExecutorRuntime({"w": {"executor": "stdio", "executor_config": config}}) as runtime:
        with pytest.raises(PayloadTooLargeError, match=r"max_message_bytes") as caught:
            await runtime.call("w", touch, str(marker), b"p" * 2_000_000)
        error = caught.value
        assert error.limit == 1_000_000 and error.size > 2_000_000
        assert str(error.size) in str(error) and "touch" in str(error)
        assert error.setting == "executor_config.max_message_bytes"
        assert not marker.exists()
        # the executor stays usable; a command under the limit runs
        assert await runtime.call("w", touch, str(marker), b"p" * 1000) == 1000
    assert marker.exists()


async def test_payload_warning_names_the_task_and_the_size_once(caplog: pytest.LogCaptureFixture) -> None:
    config = {"payload_warning_bytes": 100_000}
    caplog.set_level(logging.WARNING, logger="wove.transport")

    def measure(data: bytes) -> int:
        return len(data)

    def produce(size: int) -> bytes:
        return b"r" * size

    async with ExecutorRuntime({"w": {"executor": "stdio", "executor_config": config}}) as runtime:
        assert await runtime.call("w", measure, b"w" * 200_000) == 200_000
        sent = [r for r in caplog.records if r.name == "wove.transport" and r.levelno == logging.WARNING]
        assert len(sent) == 1
        assert "'measure'" in sent[0].getMessage() and "arguments" in sent[0].getMessage()
        assert "payload_warning_bytes=100000" in sent[0].getMessage()
        caplog.clear()
        assert len(await runtime.call("w", produce, 300_000)) == 300_000
        received = [r for r in caplog.records if r.name == "wove.transport" and r.levelno == logging.WARNING]
        assert len(received) == 1
        message = received[0].getMessage()
        assert "'produce'" in message and "result of" in message
        size = re.search(r"\((\d+) bytes\)", message)
        assert size is not None and int(size.group(1)) > 300_000


# -- our worker on the wire ---------------------------------------------------------
@asynccontextmanager
async def _worker(*flags: str) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(*WORKER, *flags, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE, limit=STREAM_LIMIT)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()


async def _answer(proc: asyncio.subprocess.Process) -> tuple[bytes | bytearray, dict[str, Any]]:
    """The next terminal event, and the raw frame it came in."""
    assert proc.stdout is not None
    while True:
        frame = await asyncio.wait_for(read_frame(proc.stdout), 20)
        assert frame is not None and not isinstance(frame, Oversized)
        if not frame.strip():
            continue
        for event in decode_events(frame):
            if event["type"] in ("task_result", "task_error", "task_cancelled"):
                return frame, event


async def test_our_worker_announces_binary_frames_and_answers_a_binary_command_in_binary() -> None:
    async with _worker() as proc:
        assert proc.stdin is not None and proc.stdout is not None
        ready = await asyncio.wait_for(read_frame(proc.stdout), 20)
        assert isinstance(ready, bytes) and "binary_frames" in parse_json(ready)["capabilities"]
        # a JSON command first (as a Wove 2.x client sends): a JSON answer
        proc.stdin.write(encode_frame(_run("add:1", lambda a, b: a + b, a=2, b=3)) + b"\n")
        raw, event = await _answer(proc)
        assert raw.startswith(b"{") and event["result"] == 5
        # a hand-made binary command: the bulky answer is binary, and from then on every bulky
        # answer is (small ones stay JSON, which costs less: wove.framing.worth_binary)
        data = bytearray(b"q" * (50 * KIB))
        proc.stdin.write(encode_frame(_run("echo:1", lambda value: value, value=data), binary=True))
        raw, event = await _answer(proc)
        assert raw.startswith(BINARY_MAGIC) and event["result"] == data
        proc.stdin.write(encode_frame(_run("add:2", lambda a, b: a + b, a=4, b=5)) + b"\n")
        raw, event = await _answer(proc)
        assert raw.startswith(b"{") and event["result"] == 9
        proc.stdin.write(encode_frame(_run("big:2", lambda n: b"b" * n, n=50 * KIB)) + b"\n")
        raw, event = await _answer(proc)
        assert raw.startswith(BINARY_MAGIC) and event["result"] == b"b" * 50 * KIB


async def test_our_worker_refuses_a_binary_command_over_max_body_bytes_and_reads_on() -> None:
    async with _worker("--max-body-bytes", "100000") as proc:
        assert proc.stdin is not None
        proc.stdin.write(encode_frame(_run("big:1", lambda obj: len(obj), obj=b"z" * 200_000), binary=True))
        proc.stdin.write(encode_frame(_run("small:1", lambda obj: len(obj), obj=b"z" * 10), binary=True))
        raw, event = await _answer(proc)
        assert raw.startswith(b"{")  # a small event: JSON, to a client that sent binary too
        assert event["type"] == "task_error" and event["run_id"] == "big:1"
        assert event["error"]["kind"] == "CommandTooLarge" and "--max-body-bytes" in event["error"]["message"]
        _raw, event = await _answer(proc)
        assert event["run_id"] == "small:1" and event["result"] == 10


async def test_large_and_small_calls_mixed_on_the_pipes_come_back_whole() -> None:
    """Binary frames read straight into their buffers (and buffers reused) interleaved with
    JSON lines, many in flight: every answer is its own call's, and a bytearray changed while
    the calls are being sent arrives as it was when its call was sent (all old or all new
    bytes, never a mix: what the pipe does not take at once is copied, not viewed)."""
    big = bytes(range(256)) * (12 * KIB)  # 3 MiB: more than a pipe holds
    mutable = bytearray(b"q" * (5 * STREAM_LIMIT))
    async with ExecutorRuntime({"w": {"executor": "stdio"}}) as runtime:
        calls = []
        for index in range(24):
            if index % 3 == 0:
                calls.append(runtime.call("w", lambda value, i: (i, value[::-1]), big, index))
            elif index % 3 == 1:
                calls.append(runtime.call("w", lambda i: (i, b"s" * i), index))
            else:
                calls.append(runtime.call("w", lambda value, i: (i, bytes(value)), mutable, index))
        sending = asyncio.gather(*calls)
        await asyncio.sleep(0)
        mutable[:] = b"z" * len(mutable)  # after the calls were sent: they carry the old bytes
        answers = await asyncio.wait_for(sending, 60)
    for index, (answer_index, value) in enumerate(answers):
        assert answer_index == index
        if index % 3 == 0:
            assert value == big[::-1]
        elif index % 3 == 1:
            assert value == b"s" * index
        else:
            assert value in (b"q" * len(mutable), b"z" * len(mutable)), value.count(b"q")


async def test_a_100_mib_argument_and_result_cross_the_pipes() -> None:
    data = bytes(range(256)) * (400 * KIB)  # 100 MiB
    async with ExecutorRuntime({"w": {"executor": "stdio",
                                      "executor_config": {"payload_warning_bytes": False}}}) as runtime:
        result = await asyncio.wait_for(runtime.call("w", lambda value: value, data), 120)
        assert result == data
        assert await runtime.call("w", lambda: "small after big") == "small after big"
