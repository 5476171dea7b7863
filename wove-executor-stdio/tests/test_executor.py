"""StdioEnvironmentExecutor configuration, start failures, and the worker on its own."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import subprocess
import sys
from typing import Any

import pytest

from wove.errors import ConfigError
from wove.protocol import decode_events, encode_frame
from wove.runtime import ExecutorRuntime
from wove.testing import tasks
from wove_executor_stdio import STREAM_LIMIT, StdioEnvironmentExecutor, read_line

WORKER = [sys.executable, "-m", "wove_executor_stdio"]


async def start(config: dict[str, Any]) -> StdioEnvironmentExecutor:
    executor = StdioEnvironmentExecutor()
    await executor.start(environment_name="test", environment_config=config, run_config={})
    return executor


# -- configuration -------------------------------------------------------------
@pytest.mark.parametrize(
    ("config", "error", "match"),
    [
        ({"command": 5}, ConfigError, "command must be a list of strings or a command string"),
        ({"command": ["python", 3]}, ConfigError, "item 3 is a int"),
        ({"command": "python 'unterminated"}, ConfigError, "cannot be split"),
        ({"processes": 0}, ConfigError, "processes must be a positive integer"),
        ({"processes": True}, ConfigError, "processes"),
        ({"env": ["A=1"]}, ConfigError, "env must be a dict"),
        ({"env": {"A": 1}}, ConfigError, "'A' maps to int 1"),
        ({"cwd": "/no/such/dir/anywhere"}, ConfigError, "not an existing directory"),
        ({"startup_timeout": 0}, ConfigError, "startup_timeout must be a positive number"),
        ({"ready_line": "yes"}, ConfigError, "ready_line must be true or false"),
        ({"max_deliveries": 0}, ValueError, "max_deliveries must be a positive integer"),
        ({"process": 4}, ConfigError, r"key 'process' \(did you mean 'processes'\?\) is not a stdio executor option"),
        ({"startup_timout": 5}, ConfigError, r"did you mean 'startup_timeout'\?.*Known keys: binary_frames, command, cwd, env"),
        ({"binary_frames": "yes"}, ConfigError, "binary_frames must be true or false"),
        ({"max_message_bytes": 0}, ConfigError, "max_message_bytes must be a positive integer"),
        ({"payload_warning_bytes": "big"}, ConfigError, "payload_warning_bytes must be a positive integer"),
        ({"ready_timeout": 1, "reconnect_timeout": 2}, ConfigError, "sets both 'reconnect_timeout' and its older"),
    ],
)
async def test_invalid_config_is_rejected(config: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        await start(config)


@pytest.mark.integration
async def test_command_string_is_split_like_a_shell() -> None:
    # a quoted argument with spaces stays one argument (a plain split would break the code)
    code = "import sys; from wove_executor_stdio.worker import main; sys.exit(main())"
    command = f"{shlex.quote(sys.executable)} -c {shlex.quote(code)} --max-concurrency 4"
    for config in ({"command": command}, {"command": [sys.executable, "-m", "wove.stdio_worker"]}, {}):
        runtime = ExecutorRuntime({"w": {"executor": "stdio", "executor_config": config}}, {})
        await runtime.start()
        try:
            assert await runtime.call("w", tasks.add, 2, 3) == 5, config
        finally:
            await runtime.stop()


async def test_send_before_start_raises() -> None:
    with pytest.raises(RuntimeError, match="not started"):
        await StdioEnvironmentExecutor().send({"type": "shutdown"})


# -- start failures --------------------------------------------------------------
async def test_start_fails_for_a_missing_command() -> None:
    with pytest.raises(FileNotFoundError, match=re.escape("'/no/such/wove-worker' of executor_config.command")):
        await start({"command": ["/no/such/wove-worker", "--flag"]})


async def test_start_fails_for_a_worker_that_exits_at_once() -> None:
    command = [sys.executable, "-c", "import sys; print('cannot import my_tasks', file=sys.stderr); sys.exit(3)"]
    with pytest.raises(RuntimeError, match=r"exited with exit code 3 during startup(.|\n)*cannot import my_tasks"):
        await start({"command": command, "processes": 2})


async def test_start_fails_for_a_silent_worker_that_exits_at_once() -> None:
    command = [sys.executable, "-c", "import sys; sys.exit(4)"]
    with pytest.raises(RuntimeError, match="exit code 4 during startup"):
        await start({"command": command, "ready_line": False})


async def test_start_fails_when_no_ready_line_comes() -> None:
    command = [sys.executable, "-c", "import time; time.sleep(20)"]
    with pytest.raises(RuntimeError, match=r"did not report ready within startup_timeout=0.5s"):
        await start({"command": command, "ready_line": True, "startup_timeout": 0.5})


async def test_garbage_on_the_workers_stdout_is_logged_not_parsed(caplog: pytest.LogCaptureFixture) -> None:
    # A worker whose own startup prints to stdout before it protects the stream.
    command = [sys.executable, "-c",
               "print('hello from a sitecustomize'); print('{not json'); import runpy; "
               "runpy.run_module('wove_executor_stdio', run_name='__main__')"]
    caplog.set_level("WARNING", logger="wove_executor_stdio.executor")
    executor = await start({"command": command})
    try:
        frame = {"type": "run_task", "run_id": "add:1", "task_id": "add", "callable": lambda a, b: a + b,
                 "args": {"a": 1, "b": 2}, "delivery": {}}
        await executor.send(frame)
        event = await asyncio.wait_for(_terminal(executor), 10)
        assert event["result"] == 3
    finally:
        await executor.stop()
    assert "hello from a sitecustomize" in caplog.text
    assert "not a valid frame" in caplog.text


async def _terminal(executor: StdioEnvironmentExecutor) -> dict[str, Any]:
    while True:
        event = await executor.recv()
        if event["type"] in ("task_result", "task_error", "task_cancelled"):
            return event


# -- line framing --------------------------------------------------------------
async def test_read_line_handles_lines_longer_than_the_limit() -> None:
    reader = asyncio.StreamReader(limit=STREAM_LIMIT)
    big = b"x" * (STREAM_LIMIT * 3 + 17)
    reader.feed_data(b"short\n" + big + b"\n" + b"tail-without-newline")
    reader.feed_eof()
    assert await read_line(reader) == b"short"
    assert await read_line(reader) == big
    assert await read_line(reader) == b"tail-without-newline"
    assert await read_line(reader) is None


# -- the worker process on its own ---------------------------------------------
def _run_worker(lines: list[bytes], timeout: float = 20) -> tuple[list[dict[str, Any]], str, int]:
    proc = subprocess.run(WORKER, input=b"".join(lines), capture_output=True, timeout=timeout)
    events = [e for line in proc.stdout.splitlines() if line.strip() for e in decode_events(line)]
    return events, proc.stderr.decode(), proc.returncode


def test_worker_answers_and_exits_zero_at_end_of_input() -> None:
    def noisy(a: int) -> int:
        print("a stray print from a task")
        return a * 2

    run = {"type": "run_task", "run_id": "noisy:1", "task_id": "noisy", "callable": noisy,
           "args": {"a": 21}, "delivery": {"delivery_orphan_policy": "detach"}}
    # end of input right after the command: a detached run still finishes and reports
    events, stderr, code = _run_worker([b"this is not json\n", b"\n", encode_frame(run) + b"\n"])
    assert code == 0
    assert events[0]["type"] == "log" and "wove_stdio_ready" in events[0]
    assert any(e["type"] == "log" and "malformed" in e["message"] for e in events)
    assert [e["result"] for e in events if e["type"] == "task_result"] == [42]
    assert "a stray print from a task" in stderr


def test_worker_reports_a_bad_run_as_task_error() -> None:
    bad = {"type": "run_task", "run_id": "x:1", "task_id": "x", "callable_pickle": "!!not base64!!"}
    events, _stderr, code = _run_worker([json.dumps(bad).encode() + b"\n"])
    assert code == 0
    errors = [e for e in events if e["type"] == "task_error"]
    assert len(errors) == 1 and errors[0]["run_id"] == "x:1" and errors[0]["error"]["kind"] == "ProtocolError"


def test_worker_shutdown_command_cancels_runs_and_exits_zero() -> None:
    async def forever() -> None:
        await asyncio.sleep(60)

    run = {"type": "run_task", "run_id": "forever:1", "task_id": "forever", "callable": forever,
           "args": {}, "delivery": {"delivery_orphan_policy": "cancel"}}
    proc = subprocess.Popen(WORKER, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(encode_frame(run) + b"\n")
        proc.stdin.flush()
        seen = []
        while "task_started" not in seen:
            seen += [e["type"] for e in decode_events(proc.stdout.readline())]
        proc.stdin.write(b'{"type":"shutdown"}\n')
        proc.stdin.flush()
        out, _err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    events = [e for line in out.splitlines() for e in decode_events(line)]
    assert [e["type"] for e in events] == ["task_cancelled"]
    assert proc.returncode == 0
