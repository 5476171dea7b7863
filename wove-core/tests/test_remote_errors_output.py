"""Remote tracebacks and remote output, without a transport: the error payload, the
exception the caller gets, the worker engine's capture and the runtime's routing."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import textwrap
import traceback
from typing import Any

import pytest

from wove.environment import (
    EnvironmentExecutionError,
    EnvironmentExecutor,
    ExecutorRuntime,
    normalize_exception,
)
from wove.errors import ConfigError, RemoteTraceback
from wove.testing import tasks
from wove.worker import WorkerEngine


class EngineExecutor(EnvironmentExecutor):
    """Frames through a WorkerEngine with capture on (as a worker service runs them);
    ``inject`` puts events in front of the test (a peer of another kind)."""

    def __init__(self) -> None:
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.engine: WorkerEngine | None = None
        self.sent: list[dict[str, Any]] = []
        self.inject: list[dict[str, Any]] | None = None

    async def start(self, *, environment_name: str, environment_config: dict[str, Any],
                    run_config: dict[str, Any]) -> None:
        self.engine = WorkerEngine(name="test", announce_start=False)

    async def send(self, frame: dict[str, Any]) -> None:
        assert self.engine is not None
        self.sent.append(frame)
        if frame["type"] == "run_task" and self.inject is not None:
            for event in self.inject:
                await self.events.put({**event, "run_id": frame["run_id"], "task_id": frame["task_id"]})
            return
        await self.engine.submit(frame, self.events.put_nowait)

    async def recv(self) -> dict[str, Any]:
        return await self.events.get()

    async def stop(self) -> None:
        if self.engine is not None:
            await self.engine.aclose()


def _run_frame(func: Any, args: dict[str, Any], *, capture: bool = True) -> dict[str, Any]:
    delivery: dict[str, Any] = {"delivery_capture_output": True} if capture else {}
    return {"type": "run_task", "run_id": f"{func.__name__}:1", "task_id": func.__name__, "callable": func,
            "args": args, "delivery": delivery}


async def _engine_events(frame: dict[str, Any], **engine: Any) -> list[dict[str, Any]]:
    worker = WorkerEngine(name="test", announce_start=False, **engine)
    events: list[dict[str, Any]] = []
    done = asyncio.Event()

    def sink(event: dict[str, Any]) -> None:
        events.append(event)
        if event["type"] in ("task_result", "task_error", "task_cancelled"):
            done.set()

    await worker.submit(frame, sink)
    await asyncio.wait_for(done.wait(), 10)
    await asyncio.sleep(0.05)  # nothing may follow the terminal event
    await worker.aclose()
    return events


# -- the error payload and the exceptions ------------------------------------------------
def test_payload_has_host_and_pid_and_the_tasks_frames_first() -> None:
    async def scenario() -> dict[str, Any]:
        events = await _engine_events(_run_frame(tasks.fail_in_helper, {"message": "m"}))
        return events[-1]["error"]

    payload = asyncio.run(scenario())
    assert payload["host"] == socket.gethostname() and payload["pid"] == os.getpid()
    assert payload["kind"] == "ValueError" and payload["source"] == "task"
    lines = payload["traceback"].splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert "in fail_in_helper" in lines[1], "the first frame shown is the task's, not the engine's"
    assert "wove/worker.py" not in payload["traceback"] and "_threads.py" not in payload["traceback"]


def test_normalize_exception_keeps_its_shape_for_other_sources() -> None:
    try:
        raise OSError("unreachable")
    except OSError as exc:
        payload = normalize_exception(exc, source="transport", retryable=True)
    assert {"kind", "message", "traceback", "retryable", "source", "host", "pid"} <= set(payload)
    assert payload["retryable"] is True and payload["message"] == "unreachable"


def test_an_unrebuilt_task_error_names_the_remote_type_and_carries_its_traceback() -> None:
    error = EnvironmentExecutionError({"kind": "KeyError", "message": "'k'", "traceback": "Traceback...\nKeyError: 'k'\n",
                                       "source": "task"})
    assert str(error) == "KeyError: 'k'"
    assert error.kind == "KeyError" and error.traceback.endswith("KeyError: 'k'\n")
    transport = EnvironmentExecutionError({"kind": "ConnectError", "message": "refused", "source": "transport"})
    assert str(transport) == "refused [transport error: ConnectError]" and transport.traceback == ""


def test_remote_traceback_prints_like_process_pool() -> None:
    error = ValueError("x")
    error.__cause__ = RemoteTraceback('Traceback (most recent call last):\n  File "job.py", line 3, in job\n'
                                      "ValueError: x\n")
    printed = "".join(traceback.format_exception(type(error), error, None))
    assert printed.startswith('wove.errors.RemoteTraceback: \n"""\nTraceback (most recent call last):')
    assert 'File "job.py", line 3, in job' in printed
    assert "The above exception was the direct cause of the following exception" in printed


async def test_wove2_shaped_error_payload_comes_back_sensibly() -> None:
    """Wove 2.x workers send no host or pid, and an extra 'adapter' field."""
    executor = EngineExecutor()
    remote_tb = 'Traceback (most recent call last):\n  File "w.py", line 9, in job\nKeyError: \'gone\'\n'
    payload = {"kind": "KeyError", "message": "'gone'", "traceback": remote_tb, "retryable": False,
               "source": "task", "adapter": "stdio"}
    async with ExecutorRuntime({"old": {"executor": executor}}) as runtime:
        executor.inject = [{"type": "task_error", "exception": KeyError("gone"), "error": payload}]
        with pytest.raises(KeyError) as rebuilt:
            await runtime.call("old", tasks.add, 1, 2)
        executor.inject = [{"type": "task_error", "error": payload}]  # no exception: it did not unpickle
        with pytest.raises(EnvironmentExecutionError) as unrebuilt:
            await runtime.call("old", tasks.add, 1, 2)
    assert isinstance(rebuilt.value.__cause__, RemoteTraceback)
    assert rebuilt.value.__cause__.traceback == remote_tb
    assert any("environment 'old', task 'add'" in n and "does not report its host and pid" in n
               for n in rebuilt.value.__notes__)
    assert str(unrebuilt.value) == "KeyError: 'gone'"
    assert unrebuilt.value.traceback == remote_tb and isinstance(unrebuilt.value.__cause__, RemoteTraceback)


async def test_an_exception_raised_in_this_process_is_left_alone() -> None:
    """In process (the local executor) the exception keeps its own traceback and chain."""
    async with ExecutorRuntime({"local": {"executor": "local"}}) as runtime:
        with pytest.raises(ValueError) as info:
            await runtime.call("local", tasks.fail_in_helper, "here")
    assert info.value.__cause__ is None and not getattr(info.value, "__notes__", None)
    assert "failing_helper" in {frame.name for frame in traceback.extract_tb(info.value.__traceback__)}


# -- capture in the engine ---------------------------------------------------------------
async def test_engine_sends_output_as_log_events_before_the_terminal() -> None:
    async def partial_lines() -> str:
        print("no newline yet", end="")
        await asyncio.sleep(0.01)
        print(" ... now", end="\n")
        print("to stderr", file=sys.stderr)
        logging.getLogger("wove.tests.capture").error("rec %s", 1, exc_info=ValueError("inside"))
        print("tail without newline", end="")
        return "ok"

    events = await _engine_events(_run_frame(partial_lines, {}))
    assert events[-1]["type"] == "task_result" and events[-1]["result"] == "ok"
    logs = events[:-1]
    assert all(e["type"] == "log" and e["run_id"] == "partial_lines:1" and e["task_id"] == "partial_lines"
               and e["pid"] == os.getpid() for e in logs), logs
    stdout = "".join(e["message"] for e in logs if e.get("stream") == "stdout")
    assert stdout == "no newline yet ... now\ntail without newline"
    assert [e["message"] for e in logs if e.get("stream") == "stderr"] == ["to stderr\n"]
    record = next(e["record"] for e in logs if "record" in e)
    assert record["name"] == "wove.tests.capture" and record["levelno"] == logging.ERROR
    assert record["msg"] == "rec 1" and "ValueError: inside" in record["exc_text"]


async def test_engine_without_the_flag_or_with_capture_off_sends_no_output(capsys: pytest.CaptureFixture[str]) -> None:
    async def loud() -> str:
        print("straight to the real stdout")
        return "ok"

    for frame, engine in ((_run_frame(loud, {}, capture=False), {}),
                          (_run_frame(loud, {}), {"capture_output": False})):
        events = await _engine_events(frame, **engine)
        assert [e["type"] for e in events] == ["task_result"]
    assert capsys.readouterr().out.count("straight to the real stdout") == 2


async def test_runtime_routes_output_tagged(capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=tasks.OUTPUT_LOGGER)
    executor = EngineExecutor()
    async with ExecutorRuntime({"here": {"executor": executor}}) as runtime:
        assert await runtime.call("here", tasks.chatty_sync, "eps", 1) == "eps"
        executor.inject = [{"type": "log", "stream": "stdout", "message": "a\nb\n", "pid": 7, "host": "elsewhere"},
                           {"type": "log", "record": {"name": "root", "levelno": 40, "levelname": "ERROR",
                                                      "msg": "from root"}, "pid": 7, "host": "elsewhere"},
                           {"type": "task_result", "result": 3}]
        assert await runtime.call("here", tasks.add, 1, 2) == 3
    assert executor.sent[0]["delivery"]["delivery_capture_output"] is True
    err = capsys.readouterr().err
    pid = os.getpid()
    assert f"(chatty_sync env=here pid={pid}) eps line 0\n" in err
    assert f"(chatty_sync env=here pid={pid}) eps err 0\n" in err
    assert "(add env=here pid=7 host=elsewhere) a\n(add env=here pid=7 host=elsewhere) b\n" in err
    forwarded = [r for r in caplog.records if hasattr(r, "wove_run_id")]
    assert [(r.name, r.getMessage()) for r in forwarded] == [
        (tasks.OUTPUT_LOGGER, f"(chatty_sync env=here pid={pid}) eps record 0"),
        ("root", "(add env=here pid=7 host=elsewhere) from root")]
    assert forwarded[1].levelno == logging.ERROR and forwarded[1].wove_host == "elsewhere"  # type: ignore[attr-defined]


async def test_capture_output_false_sends_no_flag() -> None:
    executor = EngineExecutor()
    async with ExecutorRuntime({"quiet": {"executor": executor, "capture_output": False}}) as runtime:
        assert await runtime.call("quiet", tasks.add, 1, 1) == 2
    assert "delivery_capture_output" not in executor.sent[0]["delivery"]


@pytest.mark.parametrize("value", ["yes", 1, None.__class__])
def test_capture_output_must_be_a_bool(value: Any) -> None:
    from wove.config import validate_definition

    with pytest.raises(ConfigError, match=r"Environment 'w': capture_output must be true or false, got"):
        validate_definition("w", {"executor": "local", "capture_output": value})
    validate_definition("w", {"executor": "local", "capture_output": False})


def test_the_process_keeps_its_streams_and_last_resort_logging() -> None:
    """After a captured run installed the proxies and the handler, output outside a run
    goes where it went before, and an unconfigured process still shows its warnings."""
    script = textwrap.dedent("""
        import asyncio, logging, sys
        from wove.worker import WorkerEngine

        async def task():
            print("inside the run")
            return 1

        async def main():
            engine = WorkerEngine(name="t", announce_start=False)
            events = []
            frame = {"type": "run_task", "run_id": "task:1", "task_id": "task", "callable": task, "args": {},
                     "delivery": {"delivery_capture_output": True}}
            await engine.submit(frame, events.append)
            while not any(e["type"] == "task_result" for e in events):
                await asyncio.sleep(0.01)
            await engine.aclose()
            return events

        events = asyncio.run(main())
        assert [e["message"] for e in events if e["type"] == "log"] == ["inside the run\\n"], events
        print("outside on stdout")
        print("outside on stderr", file=sys.stderr)
        logging.getLogger("unconfigured").warning("last resort still works")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "outside on stdout\n"
    assert result.stderr == "outside on stderr\nlast resort still works\n"
