"""Interop with Wove 2.0.3 (its own venv with temporalio): its temporal client runs tasks on
our worker, and our executor runs tasks on a worker written after Wove 2.x's Temporal guide."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from wove.environment import ExecutorRuntime

pytestmark = [pytest.mark.integration, pytest.mark.interop, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def wove2_temporal_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with wove==2.0.3, temporalio and cloudpickle (the 2.x side of these tests)."""
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is needed to build the Wove 2.0.3 venv (pip install uv)")
    venv = tmp_path_factory.mktemp("wove2-temporal") / "venv"
    python = venv / "bin" / "python"
    subprocess.run([uv, "venv", "--quiet", "--python", sys.executable, str(venv)], check=True, timeout=120)
    result = subprocess.run([uv, "pip", "install", "--quiet", "--python", str(python), "wove==2.0.3", "temporalio",
                             "cloudpickle"], capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, f"installing wove==2.0.3 and temporalio failed:\n{result.stderr}"
    return python


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}


WOVE2_CLIENT = textwrap.dedent('''
    import asyncio, json, sys
    from wove.environment import BackendAdapterEnvironmentExecutor

    address, queue = sys.argv[1], sys.argv[2]

    async def main():
        executor = BackendAdapterEnvironmentExecutor("temporal")
        await executor.start(environment_name="interop", run_config={}, environment_config={
            "target_host": address, "workflow": "WovePayloadWorkflow", "task_queue": queue})
        offset = 40
        frames = [
            {"type": "run_task", "run_id": "add:1", "task_id": "add", "callable": lambda a, b: a + b + offset,
             "args": {"a": 1, "b": 1}, "delivery": {}},
            {"type": "run_task", "run_id": "fail:2", "task_id": "fail", "callable": int, "args": {"x": "nope"},
             "delivery": {}},
        ]
        for frame in frames:
            await executor.send(frame)
        out = {}
        while len(out) < len(frames):
            event = await asyncio.wait_for(executor.recv(), 60)
            if event["type"] in ("task_result", "task_error", "task_cancelled"):
                out[event["run_id"]] = {"type": event["type"], "result": repr(event.get("result")),
                                        "error": str(event.get("error"))}
        await executor.stop()
        print(json.dumps(out), flush=True)

    asyncio.run(main())
''')


def test_a_wove2_client_runs_tasks_on_our_worker(wove2_temporal_python: Path, temporal_server: str,
                                                 module_worker: Any) -> None:
    result = subprocess.run([str(wove2_temporal_python), "-c", WOVE2_CLIENT, temporal_server,
                             module_worker.task_queue], capture_output=True, text=True, timeout=120, env=_clean_env())
    assert result.returncode == 0, result.stdout + result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["add:1"] == {"type": "task_result", "result": "42", "error": "None"}
    assert out["fail:2"]["type"] == "task_error" and "invalid keyword argument for int()" in out["fail:2"]["error"]


WOVE2_GUIDE_WORKER = textwrap.dedent('''
    # The worker of Wove 2.x's Temporal guide (docs/reference/backend-adapters/temporal.md).
    import asyncio, signal, sys
    from datetime import timedelta

    from temporalio import activity, workflow
    from temporalio.client import Client
    from temporalio.worker import Worker
    from wove.integrations.worker import arun


    @activity.defn
    async def run_wove_payload(payload):
        return await arun(payload)


    @workflow.defn
    class WovePayloadWorkflow:
        @workflow.run
        async def run(self, payload):
            return await workflow.execute_activity(
                run_wove_payload, payload, schedule_to_close_timeout=timedelta(minutes=30))


    async def main():
        client = await Client.connect(sys.argv[1])
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        async with Worker(client, task_queue=sys.argv[2], workflows=[WovePayloadWorkflow],
                          activities=[run_wove_payload]):
            print("listening on task queue", sys.argv[2], flush=True)
            await stop.wait()


    if __name__ == "__main__":
        asyncio.run(main())
''')


@pytest.fixture
def wove2_guide_worker(wove2_temporal_python: Path, temporal_server: str, task_queue: str,
                       tmp_path: Path) -> Iterator[str]:
    script = tmp_path / "guide_worker.py"
    script.write_text(WOVE2_GUIDE_WORKER)
    proc = subprocess.Popen([str(wove2_temporal_python), str(script), temporal_server, task_queue],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_clean_env(),
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on task queue" in line, line
        yield task_queue
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


async def test_our_executor_runs_tasks_on_a_wove2_guide_worker(temporal_server: str, wove2_guide_worker: str) -> None:
    offset = 40
    definition = {"executor": "temporal", "executor_config": {
        "target_host": temporal_server, "task_queue": wove2_guide_worker,
        "require_signed_callbacks": False}}  # Wove 2.x workers post unsigned callbacks
    async with ExecutorRuntime({"t": definition}, {}) as runtime:
        assert await runtime.call("t", lambda a, b: a + b + offset, 1, 1) == 42
        with pytest.raises(ValueError, match="invalid literal for int"):
            await runtime.call("t", int, "nope")
