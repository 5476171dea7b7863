"""Wove 2.0.3's grpc executor runs tasks on our `wove worker grpc` (unsigned and signed).

The script runs in a throwaway venv with wove==2.0.3 (the ``wove2_python`` fixture); its
tasks are lambdas, closures and builtins, which cloudpickle sends by value.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.interop]

CLIENT = r'''
import asyncio, json, sys
from wove.environment import ExecutorRuntime

target, count = sys.argv[1], int(sys.argv[2])
security = sys.argv[3] if len(sys.argv) > 3 else None

async def main():
    config = {"target": target}
    if security:
        config["security"] = security
    runtime = ExecutorRuntime({"w": {"executor": "grpc", "executor_config": config}}, {})
    await runtime.start()
    info = {"environment": "w"}
    try:
        offset = 7
        closure = lambda a, b: a + b + offset
        results = await asyncio.gather(*(
            runtime.run_task(task_name="add", task_func=closure, task_args={"a": i, "b": 1}, task_info=info)
            for i in range(count)
        ))
        built = await runtime.run_task(task_name="dict", task_func=dict, task_args={"x": 1}, task_info=info)

        def boom(message):
            raise ValueError(message)

        try:
            await runtime.run_task(task_name="boom", task_func=boom, task_args={"message": "kaput"}, task_info=info)
            error = None
        except Exception as exc:
            error = [type(exc).__name__, str(exc)]
        print(json.dumps({"ok": results == [i + 1 + offset for i in range(count)], "builtin": built,
                          "error": error}))
    finally:
        await runtime.stop()

asyncio.run(main())
'''


def run_wove2(python: Path, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    script = tmp_path / "wove2_grpc_client.py"
    script.write_text(CLIENT)
    result = subprocess.run([str(python), str(script), *args], capture_output=True, text=True, timeout=60,
                            env=env, cwd=tmp_path)
    assert result.returncode == 0, f"wove 2.0.3 client failed:\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture
def wove2(wove2_python: Path) -> Path:
    return wove2_python


def test_wove2_client_runs_tasks_unsigned(wove2: Path, grpc_worker: Any, tmp_path: Path) -> None:
    outcome = run_wove2(wove2, tmp_path, grpc_worker.target, "200")
    assert outcome == {"ok": True, "builtin": {"x": 1}, "error": ["ValueError", "kaput"]}


def test_wove2_client_runs_tasks_signed(wove2: Path, worker_factory: Any, tmp_path: Path) -> None:
    import os

    env = {**os.environ, "WOVE_INTEROP_SECRET": "shared-secret-for-interop"}
    worker = worker_factory("--security", "env:WOVE_INTEROP_SECRET", env=env)
    outcome = run_wove2(wove2, tmp_path, worker.target, "50", "env:WOVE_INTEROP_SECRET", env=env)
    assert outcome["ok"] is True and outcome["error"] == ["ValueError", "kaput"]
    # the same client without the secret is refused before anything runs
    unsigned = subprocess.run([str(wove2), str(tmp_path / "wove2_grpc_client.py"), worker.target, "1"],
                              capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert "UNAUTHENTICATED" in unsigned.stdout + unsigned.stderr
