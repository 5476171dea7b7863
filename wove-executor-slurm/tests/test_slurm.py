"""End to end on a real one-node Slurm cluster: sbatch, squeue, scancel, real job processes."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from wove.environment import EnvironmentExecutionError, ExecutorRuntime
from wove.errors import DeliveryTimeoutError, RemoteTraceback
from wove.testing import tasks

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("slurm_cluster")]

UNREACHABLE = "http://127.0.0.1:9/"
COMMAND = f"{sys.executable} -m wove_executor_slurm.job"


def _runtime(*, definition: dict[str, Any] | None = None, **config: Any) -> ExecutorRuntime:
    return ExecutorRuntime({"s": {"executor": "slurm", **(definition or {}),
                                  "executor_config": {"command": COMMAND, "poll_interval": 0.2, **config}}}, {})


def _slurm(*args: str) -> str:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=30, check=True).stdout


def _jobs(name_prefix: str) -> dict[str, str]:
    """Job name -> state of this user's jobs whose name starts with ``name_prefix``."""
    out = _slurm("squeue", "-h", "-t", "all", "-u", os.environ.get("USER") or "root", "-o", "%j|%T")
    found: dict[str, str] = {}
    for line in out.splitlines():
        name, _, state = line.strip().partition("|")
        if name.startswith(name_prefix):
            found[name] = state
    return found


async def _wait_for_file(path: Path, timeout: float, lines: int = 1) -> list[str]:
    deadline = time.monotonic() + timeout
    while not path.exists() or len(path.read_text().splitlines()) < lines:
        assert time.monotonic() < deadline, f"{path} not written ({lines} lines) within {timeout}s"
        await asyncio.sleep(0.05)
    return path.read_text().splitlines()


def _record_then_sleep(path: str, seconds: float, done: str | None = None) -> Any:
    """A sync closure (pickled by value: jobs cannot import this test module) that appends
    its pid to ``path`` (one line per execution), sleeps, appends to ``done`` and returns."""

    def record_then_sleep() -> str:
        import os
        import time

        with open(path, "a") as file:
            file.write(f"{os.getpid()}\n")
        time.sleep(seconds)
        if done:
            with open(done, "a") as file:
                file.write("done\n")
        return f"finished in {os.getpid()}"

    return record_then_sleep


def _cancellable(started: str, cancelled: str) -> Any:
    async def cancellable() -> str:
        import asyncio
        from pathlib import Path

        Path(started).write_text("started")
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            Path(cancelled).write_text("cancelled")
            raise
        return "not cancelled"

    return cancellable


def _environment_of_the_job() -> Any:
    def environment() -> dict[str, str]:
        import os

        return dict(os.environ)

    return environment


async def test_sync_and_async_tasks_and_errors() -> None:
    async with _runtime() as runtime:
        assert await runtime.call("s", tasks.add, 2, 3) == 5
        assert await runtime.call("s", tasks.echo, {"k": [1, b"x"]}) == {"k": [1, b"x"]}
        job_pid = await runtime.call("s", tasks.pid)
        assert job_pid != os.getpid()
        with pytest.raises(tasks.ContractTaskError, match="from a Slurm job"):
            await runtime.call("s", tasks.fail, "from a Slurm job")
        with pytest.raises(ValueError, match="helper broke") as info:
            await runtime.call("s", tasks.fail_in_helper, "helper broke")
        assert isinstance(info.value.__cause__, RemoteTraceback)
        assert "raise ValueError(message)  # failing_helper" in str(info.value.__cause__)


async def test_the_payload_is_in_a_private_file_not_on_the_command_line_or_in_the_environment(
        tmp_path: Path) -> None:
    folder = tmp_path / "payloads"
    folder.mkdir(mode=0o700)
    async with _runtime(payload_dir=str(folder), sbatch=["sbatch", "--hold"], job_name_prefix="held") as runtime:
        call = asyncio.ensure_future(runtime.call_with("s", tasks.echo, ("secret-argument",), delivery_timeout=30))
        for _ in range(200):
            files = list(folder.glob("*.payload.json"))
            if files:
                break
            await asyncio.sleep(0.05)
        assert len(files) == 1, list(folder.iterdir())
        assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
        (job_id,) = [line.split("|")[0] for line in _slurm("squeue", "-h", "-o", "%i|%j").splitlines()
                     if "|held-echo:" in line]
        script = _slurm("scontrol", "write", "batch_script", job_id, "-")
        described = _slurm("scontrol", "show", "job", "-d", job_id)
        payload_text = files[0].read_text()
        assert "callback_key" in payload_text and "args_pickle" in payload_text
        assert str(files[0]) in script  # the job gets the file's path, nothing of its content
        for text in (script, described):
            assert "args_pickle" not in text and "callable_pickle" not in text and "callback_key" not in text
        assert "WOVE_BACKEND_PAYLOAD" not in described
        _slurm("scontrol", "release", job_id)
        assert await call == "secret-argument"
    assert not list(folder.glob("*.payload.json")), "payload files are removed once read"
    async with _runtime(payload_dir=str(folder)) as runtime:
        env = await runtime.call("s", _environment_of_the_job())
    assert "WOVE_BACKEND_PAYLOAD" not in env
    assert not any("args_pickle" in value for value in env.values())


@pytest.mark.parametrize("channel", ["auto", "engine"])
async def test_results_come_back_in_the_output_file_when_the_callback_is_unreachable(channel: str) -> None:
    async with _runtime(callback_url=UNREACHABLE, result_channel=channel) as runtime:
        assert await runtime.call("s", tasks.add, 20, 22) == 42
        assert await runtime.call("s", tasks.echo, "async") == "async"
        with pytest.raises(ValueError, match="unreachable caller") as info:
            await runtime.call("s", tasks.fail_in_helper, "unreachable caller")
        assert "failing_helper" in str(info.value.__cause__)
        assert await asyncio.gather(*(runtime.call("s", tasks.add, i, 1) for i in range(10))) == list(range(1, 11))


async def test_delivery_timeout_scancels_the_job_and_the_task_sees_it(tmp_path: Path) -> None:
    started, cancelled = tmp_path / "started", tmp_path / "cancelled"
    async with _runtime(job_name_prefix="timeout") as runtime:
        with pytest.raises(DeliveryTimeoutError, match="delivery_timeout"):
            await runtime.call_with("s", _cancellable(str(started), str(cancelled)), delivery_timeout=2.0)
        assert started.exists()
        await _wait_for_file(cancelled, 15)  # scancel's SIGTERM cancelled the run in the job
        assert await runtime.call("s", tasks.add, 1, 1) == 2
    states = _jobs("timeout-cancellable:")
    assert list(states.values()) == ["CANCELLED"], states


async def test_idempotency_key_is_the_job_name(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    folder = tmp_path / "payloads"
    folder.mkdir()
    task = _record_then_sleep(str(runs), 1.0)
    prefix = f"keyed{os.getpid()}x{time.monotonic_ns() % 10**8}"
    async with _runtime(job_name_prefix=prefix, payload_dir=str(folder)) as runtime:
        first, second = await asyncio.gather(
            runtime.call_with("s", task, delivery_idempotency_key="report-42"),
            runtime.call_with("s", task, delivery_idempotency_key="report-42"))
        assert first == second and first.startswith("finished in ")
        assert await runtime.call_with("s", task, delivery_idempotency_key="report-42") == first
        assert await runtime.call_with("s", task, delivery_idempotency_key="report-43") != first
    assert len(runs.read_text().splitlines()) == 2, "a duplicate submission ran the task again"
    # another runtime (another process, the same payload_dir) finds the job by its name
    async with _runtime(job_name_prefix=prefix, payload_dir=str(folder)) as runtime:
        assert await runtime.call_with("s", task, delivery_idempotency_key="report-42") == first
    assert len(runs.read_text().splitlines()) == 2
    assert _jobs(prefix) == {f"{prefix}-report-42": "COMPLETED", f"{prefix}-report-43": "COMPLETED"}


async def test_killed_job_ends_the_run_with_an_error_naming_slurm(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    async with _runtime() as runtime:
        call = asyncio.ensure_future(runtime.call("s", _record_then_sleep(str(runs), 60)))
        (pid,) = await _wait_for_file(runs, 30)
        os.kill(int(pid), signal.SIGKILL)
        with pytest.raises(EnvironmentExecutionError) as info:
            await asyncio.wait_for(call, 30)
    message = str(info.value)
    assert "slurm executor: Slurm job " in message and "'wove-record_then_sleep:" in message, message
    assert "ended FAILED" in message and "killed by signal 9" in message, message


async def test_killed_job_with_requeue_runs_once_more(tmp_path: Path) -> None:
    runs, done = tmp_path / "runs", tmp_path / "done"
    async with _runtime(definition={"delivery_orphan_policy": "requeue"}) as runtime:
        call = asyncio.ensure_future(runtime.call("s", _record_then_sleep(str(runs), 2.0, str(done))))
        (pid,) = await _wait_for_file(runs, 30)
        os.kill(int(pid), signal.SIGKILL)
        result = await asyncio.wait_for(call, 60)
    pids = runs.read_text().splitlines()
    assert len(pids) == 2 and pids[0] == pid and result == f"finished in {pids[1]}"
    assert done.read_text().splitlines() == ["done"], "the re-delivered run completed exactly once"


async def test_a_custom_submit_callable_is_used_and_its_job_watched(tmp_path: Path) -> None:
    submitted: list[str] = []

    async def submit(payload: dict[str, Any], frame: dict[str, Any], config: dict[str, Any]) -> str:
        import json

        path = tmp_path / f"{len(submitted)}.json"
        path.write_text(json.dumps(payload))
        path.chmod(0o600)
        job_id = _slurm("sbatch", "--parsable", "--output", str(tmp_path / "custom.out"), "--wrap",
                        f"exec {COMMAND} {path}").strip()
        submitted.append(job_id)
        return job_id

    async with _runtime(submit=submit, callback_url=UNREACHABLE) as runtime:
        # the callback is unreachable and the adapter does not know this job's output file:
        # the job ends, no outcome arrives, and the run is lost naming the job
        with pytest.raises(EnvironmentExecutionError, match=r"Slurm job \d+ \('\(custom submit\)'\) ended COMPLETED"):
            await runtime.call("s", tasks.add, 1, 2)
    assert len(submitted) == 1
    async with _runtime(submit=submit) as runtime:
        assert await runtime.call("s", tasks.add, 1, 2) == 3
    assert len(submitted) == 2


@pytest.mark.timeout(240)
async def test_500_tasks_with_64_in_flight() -> None:
    async with _runtime(definition={"delivery_max_in_flight": 64}) as runtime:
        results = await asyncio.gather(*(runtime.call("s", tasks.add, i, i) for i in range(250)),
                                       *(runtime.call("s", tasks.echo, i) for i in range(250)))
        assert results == [2 * i for i in range(250)] + list(range(250))


async def test_an_sbatch_failure_ends_the_run_quoting_sbatch() -> None:
    async with _runtime(sbatch=["sbatch", "--partition=no-such-partition"]) as runtime:
        with pytest.raises(EnvironmentExecutionError, match=r"sbatch --partition=no-such-partition --parsable "
                                                            r"--job-name wove-add:\w+ \.\.\.` failed \(exit 1\): "
                                                            r"sbatch: error: .*[Pp]artition"):
            await runtime.call("s", tasks.add, 1, 2)


async def test_cancelling_a_duplicate_leaves_the_shared_job_running(tmp_path: Path) -> None:
    runs, done = tmp_path / "runs", tmp_path / "done"
    task = _record_then_sleep(str(runs), 2.0, str(done))
    prefix = f"shared{os.getpid()}x{time.monotonic_ns() % 10**8}"
    async with _runtime(job_name_prefix=prefix) as runtime:
        first = asyncio.ensure_future(runtime.call_with("s", task, delivery_idempotency_key="k"))
        await _wait_for_file(runs, 30)
        duplicate = asyncio.ensure_future(runtime.call_with("s", task, delivery_idempotency_key="k"))
        await asyncio.sleep(0.5)
        duplicate.cancel()
        with pytest.raises(asyncio.CancelledError):
            await duplicate
        assert (await first).startswith("finished in ")
    assert done.read_text().splitlines() == ["done"] and len(runs.read_text().splitlines()) == 1
    assert _jobs(prefix) == {f"{prefix}-k": "COMPLETED"}


async def test_a_given_payload_dir_keeps_only_the_keyed_outcomes(tmp_path: Path) -> None:
    folder = tmp_path / "payloads"
    folder.mkdir()
    prefix = f"tidy{os.getpid()}x{time.monotonic_ns() % 10**8}"
    async with _runtime(payload_dir=str(folder), job_name_prefix=prefix) as runtime:
        assert await asyncio.gather(*(runtime.call("s", tasks.add, i, 1) for i in range(5))) == [1, 2, 3, 4, 5]
        assert await runtime.call_with("s", tasks.add, (1, 1), delivery_idempotency_key="kept") == 2
    assert sorted(path.name for path in folder.iterdir()) == [f"{prefix}-kept.out"]
