"""Wove 2.x's worker entry points, run for real in subprocesses.

``python -m wove.stdio_worker`` (wove-executor-stdio), ``python -m wove.backend_worker`` and
``wove.integrations.worker.run`` (wove-backend) exist under their 2.x names, so workers can
move to this project before their clients; without the distribution they name it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from wove.protocol import TERMINAL_EVENTS, decode_events, encode_frame
from wove.testing import tasks

CORE = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def callback_server() -> Any:
    from wove_backend import BackendCallbackServer

    server = BackendCallbackServer()
    await server.start()
    yield server
    await server.stop()


def _payload(server: Any, func: Any, args: dict[str, Any], run_id: str) -> dict[str, Any]:
    from wove_backend import build_backend_payload

    frame = {"type": "run_task", "run_id": run_id, "task_id": run_id.split(":")[0], "callable": func,
             "args": args, "delivery": {}}
    return build_backend_payload(frame, callback_url=server.callback_url, adapter="test")


async def _until_terminal(server: Any) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    while not events or events[-1]["type"] not in TERMINAL_EVENTS:
        events.append(await asyncio.wait_for(server.recv(), 20))
    return events


async def _run(*command: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, [sys.executable, *command], capture_output=True, text=True,
                                   timeout=50, env={**os.environ, **(env or {})})


@pytest.mark.integration
async def test_backend_worker_runs_the_payload_of_its_argument(callback_server: Any) -> None:
    from wove_backend import payload_to_b64

    encoded = payload_to_b64(_payload(callback_server, tasks.add, {"a": 20, "b": 22}, "add:1"))
    done = await _run("-m", "wove.backend_worker", encoded)
    assert done.returncode == 0, done.stderr
    events = await _until_terminal(callback_server)
    assert events[-1]["type"] == "task_result" and events[-1]["result"] == 42 and events[-1]["run_id"] == "add:1"


@pytest.mark.integration
async def test_backend_worker_reads_the_payload_from_the_environment(callback_server: Any) -> None:
    from wove_backend import payload_to_b64

    encoded = payload_to_b64(_payload(callback_server, tasks.fail, {"message": "boom"}, "fail:1"))
    done = await _run("-m", "wove.backend_worker", env={"WOVE_BACKEND_PAYLOAD": encoded})
    assert done.returncode == 0, done.stderr  # the task's error travels in the callback
    error = (await _until_terminal(callback_server))[-1]
    assert error["type"] == "task_error" and isinstance(error["exception"], tasks.ContractTaskError)


@pytest.mark.integration
async def test_backend_worker_without_a_valid_payload_says_what_was_wrong() -> None:
    missing = await _run("-m", "wove.backend_worker", env={"WOVE_BACKEND_PAYLOAD": ""})
    assert missing.returncode == 1
    assert "Missing dispatch payload. Pass it as argv[1] or WOVE_BACKEND_PAYLOAD." in missing.stderr
    garbage = await _run("-m", "wove.backend_worker", "not-base64!")
    assert garbage.returncode == 1 and "is not base64 of a JSON object" in garbage.stderr
    assert "Traceback" not in garbage.stderr
    usage = await _run("-m", "wove_backend", "--help")
    assert usage.returncode == 0 and "WOVE_BACKEND_PAYLOAD" in usage.stdout


@pytest.mark.integration
async def test_integrations_worker_run_returns_the_result_and_posts_it(callback_server: Any) -> None:
    from wove_backend import payload_to_b64

    encoded = payload_to_b64(_payload(callback_server, tasks.echo, {"value": "hi"}, "echo:1"))
    code = ("import sys; from wove.backend import payload_from_b64; from wove.integrations.worker import run; "
            "print(repr(run(payload_from_b64(sys.argv[1]))))")
    done = await _run("-c", code, encoded)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "'hi'"
    assert (await _until_terminal(callback_server))[-1]["result"] == "hi"


@pytest.mark.integration
async def test_stdio_worker_answers_a_run_task_line_on_stdin() -> None:
    command = {"type": "run_task", "run_id": "add:1", "task_id": "add", "callable": tasks.add,
               "args": {"a": 2, "b": 3}, "delivery": {}}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wove.stdio_worker", "--adapter", "stdio",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(encode_frame(command) + b"\n")
        await proc.stdin.drain()
        runs: list[dict[str, Any]] = []
        while not runs or runs[-1]["type"] not in TERMINAL_EVENTS:
            line = await asyncio.wait_for(proc.stdout.readline(), 20)
            assert line, "the stdio worker closed stdout before answering"
            runs.extend(event for event in decode_events(line) if event.get("run_id") == "add:1")
        assert [event["type"] for event in runs] == ["task_started", "task_result"]
        assert runs[-1]["result"] == 5
        proc.stdin.close()  # end of input: the worker exits 0
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_without_their_distributions_the_entry_points_name_them(tmp_path: Path, throwaway_venv: Any) -> None:
    throwaway_venv.install(str(CORE))
    python, env = str(throwaway_venv.python), throwaway_venv.env

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([python, *args], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)

    stdio = run("-m", "wove.stdio_worker")
    assert stdio.returncode == 2
    assert stdio.stderr.strip() == ("python -m wove.stdio_worker needs wove-executor-stdio: "
                                    "pip install wove-executor-stdio (from a checkout of this project: pip install "
                                    "./wove-core ./wove-executor-stdio, or uv sync --all-packages; see docs/installing.md)")
    backend = run("-m", "wove.backend_worker", "e30=")
    assert backend.returncode == 2
    assert backend.stderr.strip() == ("python -m wove.backend_worker needs wove-backend: pip install wove-backend "
                                      "(from a checkout of this project: pip install ./wove-core ./wove-backend, "
                                      "or uv sync --all-packages; see docs/installing.md)")
    for statement in ("import wove.backend", "import wove.integrations.worker",
                      "from wove.environment import BackendAdapterEnvironmentExecutor"):
        imported = run("-c", statement)
        assert imported.returncode == 1, statement
        last = imported.stderr.strip().splitlines()[-1]
        assert last.startswith("ImportError: ") and "wove-backend distribution, which is not installed" in last, last
        assert last.endswith("Install it with: pip install wove-backend (from a checkout of this project: "
                             "pip install ./wove-core ./wove-backend, or uv sync --all-packages; see "
                             "docs/installing.md)"), last
    # a worker without pytest unpickles the test kit's tasks (wove.testing.tasks imports no pytest)
    no_pytest = run("-c", "import wove.testing.tasks as t, importlib.util as u; "
                          "print(t.add(1, 2), u.find_spec('pytest') is None)")
    assert no_pytest.returncode == 0, no_pytest.stderr
    assert no_pytest.stdout.split() == ["3", "True"]
    # the core itself still works: a task on the local executor
    local = run("-c", "import asyncio; from wove.environment import ExecutorRuntime as R\n"
                "async def main():\n"
                "    rt = R({'l': {'executor': 'local'}}, {})\n"
                "    await rt.start()\n"
                "    try:\n"
                "        print(await rt.run_task(task_name='t', task_func=lambda: 7, task_args={},"
                " task_info={'environment': 'l'}))\n"
                "    finally:\n"
                "        await rt.stop()\n"
                "asyncio.run(main())")
    assert local.returncode == 0, local.stderr
    assert local.stdout.strip() == "7"
