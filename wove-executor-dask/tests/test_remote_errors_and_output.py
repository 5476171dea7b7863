"""Remote tracebacks and output from Dask worker processes (not the in-process cluster of
the contract run): the exception crosses a process boundary, and so does the output."""

from __future__ import annotations

import logging
import os
import re
import traceback
from typing import Any

import pytest

from wove.environment import EnvironmentExecutionError, ExecutorRuntime
from wove.errors import RemoteTraceback
from wove.testing import tasks

pytestmark = pytest.mark.timeout(90)


def _runtime(address: str, **definition: Any) -> ExecutorRuntime:
    return ExecutorRuntime({"dask": {"executor": "dask", "executor_config": {"address": address},
                                     **definition}}, {})


async def test_a_worker_process_traceback_is_the_cause(process_cluster: Any) -> None:
    async with _runtime(process_cluster.scheduler_address) as runtime:
        worker_pid = await runtime.call("dask", tasks.pid)
        with pytest.raises(ValueError, match="from a dask worker") as info:
            await runtime.call("dask", tasks.fail_in_helper, "from a dask worker")
        with pytest.raises(EnvironmentExecutionError) as unrebuilt:
            await runtime.call("dask", tasks.raise_unrebuildable, "one", "two")
    assert worker_pid != os.getpid()
    error = info.value
    assert str(error) == "from a dask worker"
    assert isinstance(error.__cause__, RemoteTraceback)
    remote = str(error.__cause__)
    assert "in failing_helper" in remote and "raise ValueError(message)  # failing_helper" in remote, remote
    assert "wove/worker.py" not in remote, "the engine's own frames are left out of the task's traceback"
    notes = getattr(error, "__notes__", [])
    assert any("environment 'dask', task 'fail_in_helper'" in note and "pid " in note for note in notes), notes
    printed = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    assert "The above exception was the direct cause" in printed and "failing_helper" in printed
    assert "UnrebuildableError: one and two" in str(unrebuilt.value)
    assert "raise_unrebuildable" in unrebuilt.value.traceback
    assert any("could not be rebuilt here" in note for note in getattr(unrebuilt.value, "__notes__", []))


async def test_worker_process_output_reaches_the_caller(process_cluster: Any, capsys: pytest.CaptureFixture[str],
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=tasks.OUTPUT_LOGGER)
    async with _runtime(process_cluster.scheduler_address) as runtime:
        worker_pid = await runtime.call("dask", tasks.pid)
        assert await runtime.call("dask", tasks.chatty_sync, "gamma", 3) == "gamma"
        assert await runtime.call("dask", tasks.chatty, "delta", 3) == "delta"
    err = capsys.readouterr().err
    for task, tag in (("chatty_sync", "gamma"), ("chatty", "delta")):
        for index in range(3):
            line = rf"\({task} env=dask pid=(\d+)(?: host=\S+)?\) {tag} line {index}"
            match = re.search(line, err)
            assert match, (line, err)
            assert int(match.group(1)) != os.getpid()
    records = [r for r in caplog.records if getattr(r, "wove_environment", None) == "dask"]
    assert sorted(r.getMessage().split(") ", 1)[1] for r in records) == sorted(
        [f"gamma record {i}" for i in range(3)] + [f"delta record {i}" for i in range(3)])
    assert {r.name for r in records} == {tasks.OUTPUT_LOGGER}
    pids = {getattr(r, "wove_pid", None) for r in records}
    assert os.getpid() not in pids and all(isinstance(pid, int) for pid in pids), pids
    assert worker_pid != os.getpid()


async def test_capture_output_false_keeps_it_on_the_worker(process_cluster: Any, capsys: pytest.CaptureFixture[str],
                                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=tasks.OUTPUT_LOGGER)
    async with _runtime(process_cluster.scheduler_address, capture_output=False) as runtime:
        assert await runtime.call("dask", tasks.chatty, "silent", 2) == "silent"
    assert "silent line" not in capsys.readouterr().err
    assert not [r for r in caplog.records if hasattr(r, "wove_run_id")]
