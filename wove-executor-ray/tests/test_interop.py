"""Wove 2.0.3 on either side of a real Ray cluster.

* a Wove 2.0.3 client's ``ray`` environment runs its tasks on Ray workers that have this
  project instead (they import ``wove.integrations.worker.run``, ours);
* this project's ray executor runs tasks on Ray workers that have only Wove 2.0.3 (a head
  started from a venv with wove==2.0.3 and Ray); 2.0.3 workers post unsigned callbacks,
  so that environment sets ``require_signed_callbacks: false``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from .ray_cluster import RayHead

pytestmark = [pytest.mark.interop, pytest.mark.integration, pytest.mark.timeout(240)]

WOVE2_CLIENT = textwrap.dedent('''
    import asyncio, json, sys
    from wove.environment import BackendAdapterEnvironmentExecutor

    def where():
        import importlib.metadata, importlib.util, os
        return {"wove_backend": importlib.util.find_spec("wove_backend") is not None,
                "wove_core": importlib.metadata.version("wove-core"), "pid": os.getpid()}

    async def main():
        executor = BackendAdapterEnvironmentExecutor("ray")
        await executor.start(environment_name="interop", run_config={},
                             environment_config={"address": sys.argv[1], "init_options": {"logging_level": "WARNING"}})
        offset = 40
        frames = [
            {"type": "run_task", "run_id": "where:1", "task_id": "where", "callable": where, "args": {}, "delivery": {}},
            {"type": "run_task", "run_id": "add:2", "task_id": "add", "callable": lambda a, b: a + b + offset,
             "args": {"a": 1, "b": 1}, "delivery": {}},
            {"type": "run_task", "run_id": "div:3", "task_id": "div", "callable": lambda: 1 / 0, "args": {},
             "delivery": {}},
        ]
        for frame in frames:
            await executor.send(frame)
        out = {}
        while len(out) < len(frames):
            event = await asyncio.wait_for(executor.recv(), 60)
            if event["type"] in ("task_result", "task_error", "task_cancelled"):
                out[event["run_id"]] = {"type": event["type"], "result": event.get("result"),
                                        "exception": type(event.get("exception")).__name__}
        await executor.stop()
        print(json.dumps(out))

    asyncio.run(main())
''')


def _run(python: Path | str, script: str, *args: str) -> dict[str, Any]:
    env = {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "PYTHONPATH")}
    result = subprocess.run([str(python), "-c", script, *args], capture_output=True, text=True, timeout=180,
                            env={**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def test_a_wove2_client_runs_tasks_on_ray_workers_with_this_project(wove2_ray_python: Path, ray_address: str) -> None:
    out = _run(wove2_ray_python, WOVE2_CLIENT, ray_address)
    where = out["where:1"]
    assert where["type"] == "task_result"
    assert where["result"]["wove_backend"] is True and where["result"]["wove_core"]  # our worker, not 2.x
    assert out["add:2"] == {"type": "task_result", "result": 42, "exception": "NoneType"}
    assert out["div:3"]["type"] == "task_error" and out["div:3"]["exception"] == "ZeroDivisionError"


OUR_CLIENT = textwrap.dedent('''
    import asyncio, json, sys
    from wove.environment import ExecutorRuntime

    def where():
        import importlib.metadata, importlib.util, os
        return {"wove": importlib.metadata.version("wove"),
                "wove_backend": importlib.util.find_spec("wove_backend") is not None, "pid": os.getpid()}

    async def main():
        config = {"address": sys.argv[1], "require_signed_callbacks": False,
                  "init_options": {"logging_level": "WARNING"}}
        async with ExecutorRuntime({"ray": {"executor": "ray", "executor_config": config}}, {}) as runtime:
            out = {"where": await runtime.call("ray", where)}
            factor = 2
            out["double"] = await runtime.call("ray", lambda x: x * factor, 21)
            try:
                await runtime.call("ray", lambda: 1 / 0)
            except ZeroDivisionError as exc:
                out["error"] = type(exc).__name__
            out["many"] = await asyncio.gather(*(runtime.call("ray", lambda i=i: i * i) for i in range(10)))
        print(json.dumps(out))

    asyncio.run(main())
''')


def test_this_executor_runs_tasks_on_ray_workers_with_wove2(wove2_ray_head: RayHead) -> None:
    out = _run(sys.executable, OUR_CLIENT, wove2_ray_head.address)
    assert out["where"]["wove"] == "2.0.3" and out["where"]["wove_backend"] is False
    assert out["double"] == 42
    assert out["error"] == "ZeroDivisionError"
    assert out["many"] == [i * i for i in range(10)]
