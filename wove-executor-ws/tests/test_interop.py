"""Wove 2.0.3's own websocket executor runs tasks on ``wove worker websocket``.

The reference peer lives in its own venv (fixture ``wove2_python`` from the root
conftest); the script runs there, with lambdas and builtins (pickled by value / by
reference to the stdlib) because our test modules are not importable in that venv.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from .conftest import SECRET, SECRET_ENV

SCRIPT = r'''
import asyncio, json, sys
import websockets
from wove.environment import ExecutorRuntime

url, security = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)

async def main():
    config = {"url": url}
    if security:
        config["security"] = security
    runtime = ExecutorRuntime({"ws": {"executor": "websocket", "executor_config": config}}, {})
    await runtime.start()
    info = {"environment": "ws"}
    try:
        square = await runtime.run_task(task_name="square", task_func=lambda x: x * x,
                                        task_args={"x": 7}, task_info=info)
        many = await asyncio.gather(*(
            runtime.run_task(task_name="add", task_func=lambda a, b: a + b,
                             task_args={"a": i, "b": i}, task_info=info)
            for i in range(200)
        ))
        big = await runtime.run_task(task_name="big", task_func=lambda n: "y" * n,
                                     task_args={"n": 200_000}, task_info=info)
        try:
            await runtime.run_task(task_name="boom", task_func=lambda: 1 / 0, task_args={}, task_info=info)
            error = None
        except ZeroDivisionError as exc:
            error = type(exc).__name__
    finally:
        await runtime.stop()
    print(json.dumps({"square": square, "many_ok": many == [2 * i for i in range(200)],
                      "big": len(big), "error": error, "websockets": websockets.__version__}))

asyncio.run(main())
'''


def run_wove2(python: Path, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    script = tmp_path / "wove2_client.py"
    script.write_text(SCRIPT)
    import os

    out = subprocess.run([str(python), str(script), *args], capture_output=True, text=True, timeout=60,
                         env={**os.environ, **(env or {})})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def wove2(request: pytest.FixtureRequest) -> Path:
    try:
        return Path(request.getfixturevalue("wove2_python"))
    except RuntimeError as exc:
        pytest.skip(f"could not build the wove==2.0.3 venv: {exc}")


def test_wove2_client_unsigned(wove2: Path, shared_worker: Any, tmp_path: Path) -> None:
    result = run_wove2(wove2, tmp_path, shared_worker.url)
    assert result["square"] == 49
    assert result["many_ok"] is True
    assert result["big"] == 200_000
    assert result["error"] == "ZeroDivisionError"
    print("wove 2.0.3 venv websockets", result["websockets"])


def test_wove2_client_signed(wove2: Path, signed_worker: Any, tmp_path: Path) -> None:
    result = run_wove2(wove2, tmp_path, signed_worker.url, f"env:{SECRET_ENV}", env={SECRET_ENV: SECRET})
    assert result["square"] == 49 and result["many_ok"] is True and result["error"] == "ZeroDivisionError"


def test_wove2_client_with_wrong_secret_is_rejected(wove2: Path, signed_worker: Any, tmp_path: Path) -> None:
    script = tmp_path / "wove2_client.py"
    script.write_text(SCRIPT)
    import os

    out = subprocess.run([str(wove2), str(script), signed_worker.url, f"env:{SECRET_ENV}"], capture_output=True,
                         text=True, timeout=60, env={**os.environ, SECRET_ENV: "wrong"})
    assert out.returncode != 0 and "403" in out.stderr
