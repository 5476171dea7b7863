"""stdio specifics of remote tracebacks and output: a Wove 2.0.3 worker's errors, and the
worker's fd 1 protection with output capture on."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pytest

from wove.environment import EnvironmentExecutionError, ExecutorRuntime
from wove.errors import RemoteTraceback

pytestmark = [pytest.mark.integration]


@pytest.mark.interop
async def test_wove2_worker_errors_come_back_with_its_traceback(wove2_python: Path) -> None:
    """A Wove 2.0.3 worker sends error_pickle (no host or pid) and exception_pickle; it
    ignores delivery_capture_output. The exception still comes back with the worker's
    traceback as __cause__; one that cannot be rebuilt names its type and message."""
    config = {"command": [str(wove2_python), "-m", "wove.stdio_worker"]}

    # defined here so they travel by value (wove-core is not importable over there)
    def wove2_helper(value: int) -> None:
        raise ValueError(f"bad value {value}")

    def wove2_task(value: int) -> None:
        wove2_helper(value)

    class TwoArgError(Exception):
        def __init__(self, left: str, right: str) -> None:
            super().__init__(f"{left}/{right}")

    def raise_two_arg() -> None:
        raise TwoArgError("left", "right")

    async with ExecutorRuntime({"old": {"executor": "stdio", "executor_config": config}}) as runtime:
        with pytest.raises(ValueError, match="bad value 7") as info:
            await runtime.call("old", wove2_task, 7)
        with pytest.raises(EnvironmentExecutionError) as unrebuilt:
            await runtime.call("old", raise_two_arg)
        assert await runtime.call("old", lambda: 1 + 1) == 2  # still serving
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "wove2_helper" in str(cause) and "wove2_task" in str(cause), str(cause)
    notes = getattr(info.value, "__notes__", [])
    assert any("environment 'old'" in note and "does not report its host and pid" in note for note in notes), notes
    assert "TwoArgError: left/right" in str(unrebuilt.value)
    assert "raise_two_arg" in unrebuilt.value.traceback
    assert isinstance(unrebuilt.value.__cause__, RemoteTraceback)


async def test_fd1_writes_still_go_to_stderr_with_capture_on(capsys: pytest.CaptureFixture[str],
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """print() is captured and comes back tagged; a C-level write to fd 1 (which no
    capture sees) still lands on the worker's stderr, never in the event stream."""
    caplog.set_level(logging.INFO, logger="wove_executor_stdio")

    def noisy() -> int:
        import os as worker_os

        print("captured by print")
        worker_os.write(1, b"raw bytes on fd 1\n")
        return worker_os.getpid()

    async with ExecutorRuntime({"w": {"executor": "stdio"}}) as runtime:
        pid = await runtime.call("w", noisy)
        assert await runtime.call("w", noisy) == pid  # the event stream is intact
    err = capsys.readouterr().err
    assert re.search(rf"^\(noisy env=w pid={pid}\) captured by print$", err, re.M), err
    assert "(noisy env=w" not in err.split("captured by print")[-1], "fd 1 writes are not captured as output"
    worker_lines = [r.getMessage() for r in caplog.records if r.name.startswith("wove_executor_stdio")]
    assert any(f"(pid {pid}): raw bytes on fd 1" in line for line in worker_lines), worker_lines
    assert not any("not a frame" in line for line in worker_lines), worker_lines
    assert pid != os.getpid()

