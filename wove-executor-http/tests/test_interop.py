"""Interop with the reference peer, wove==2.0.3 (its own venv: fixture ``wove2_python``)."""

from __future__ import annotations

import base64
import json
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest

from wove.environment import ExecutorRuntime
from wove.protocol import decode_command, is_binary
from wove.testing import tasks

from .conftest import SECRET, SECRET_ENV, Worker, run, serve_asgi

pytestmark = [pytest.mark.integration, pytest.mark.interop]

WOVE2_CLIENT = textwrap.dedent('''
    import asyncio, json, sys
    from wove.environment import HttpEnvironmentExecutor

    url, security = sys.argv[1], sys.argv[2]

    async def main():
        executor = HttpEnvironmentExecutor()
        await executor.start(environment_name="interop", run_config={},
                             environment_config={"url": url, "security": security, "timeout": 20})
        offset = 40
        frames = [
            {"type": "run_task", "run_id": "add:1", "task_id": "add", "callable": lambda a, b: a + b + offset,
             "args": {"a": 1, "b": 1}, "delivery": {}},
            {"type": "run_task", "run_id": "dict:2", "task_id": "dict", "callable": dict, "args": {"x": 3},
             "delivery": {}},
        ]
        for frame in frames:
            await executor.send(frame)
        out = {}
        while len(out) < len(frames):
            event = await asyncio.wait_for(executor.recv(), 20)
            if event["type"] in ("task_result", "task_error", "task_cancelled"):
                out[event["run_id"]] = {"type": event["type"], "result": repr(event.get("result")),
                                        "error": str(event.get("error"))}
        await executor.stop()
        print(json.dumps(out))

    asyncio.run(main())
''')


def _run_wove2(python: Path, script: str, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    import os

    result = subprocess.run([str(python), "-c", script, *args], capture_output=True, text=True, timeout=60,
                            env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_wove2_client_runs_tasks_on_our_signed_worker(wove2_python: Path, signed_worker: Worker) -> None:
    out = _run_wove2(wove2_python, WOVE2_CLIENT, signed_worker.url, f"env:{SECRET_ENV}", env={SECRET_ENV: SECRET})
    assert out["add:1"] == {"type": "task_result", "result": "42", "error": "None"}
    assert out["dict:2"]["result"] == "{'x': 3}"


def test_wove2_client_with_a_wrong_secret_is_refused(wove2_python: Path, signed_worker: Worker) -> None:
    out = _run_wove2(wove2_python, WOVE2_CLIENT, signed_worker.url, f"env:{SECRET_ENV}",
                     env={SECRET_ENV: "a wrong secret"})
    assert {event["type"] for event in out.values()} == {"task_error"}
    assert "403" in out["add:1"]["error"]


WOVE2_VERIFY = textwrap.dedent('''
    import base64, json, sys
    from wove.security import NetworkExecutorSecurity

    captured = json.loads(sys.stdin.read())
    security = NetworkExecutorSecurity(mode="signed", secret=sys.argv[1])
    body = base64.b64decode(captured["body"])
    result = {}
    try:
        security.verify_headers(headers=captured["headers"], transport="http", target=captured["target"], body=body)
        result["valid"] = "ok"
    except Exception as exc:
        result["valid"] = repr(exc)
    try:
        security.verify_headers(headers=captured["headers"], transport="http", target=captured["target"],
                                body=body + b" ")
        result["tampered"] = "accepted"
    except Exception as exc:
        result["tampered"] = "rejected"
    print(json.dumps(result))
''')


async def _capture_signed_request(secret_env: str, binary: bool) -> dict[str, Any]:
    """Run one task through our executor against a recorder (announcing binary frames or
    not, like a Wove 3 or 2.x worker); return what it sent."""
    captured: dict[str, Any] = {}
    announce = [(b"x-wove-capabilities", b"binary_frames")] if binary else []

    async def recorder(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] != "POST":  # the capability probe (GET <path>/health)
            await send({"type": "http.response.start", "status": 200 if binary else 404, "headers": announce})
            await send({"type": "http.response.body", "body": b"{}"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        frame = decode_command(body)
        captured.update(headers={k.decode(): v.decode() for k, v in scope["headers"]},
                        body=base64.b64encode(body).decode(), target=scope["raw_path"].decode(),
                        binary=is_binary(body))
        event = {"type": "task_result", "run_id": frame["run_id"], "task_id": frame["task_id"],
                 "result_pickle": "gAVOLg=="}  # pickled None
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), *announce]})
        await send({"type": "http.response.body", "body": json.dumps({"events": [event]}).encode()})

    async with serve_asgi(recorder) as port:
        url = f"http://127.0.0.1:{port}/wove/signed"
        definition = {"w": {"executor": "http", "executor_config": {"url": url, "security": f"env:{secret_env}"}}}
        async with ExecutorRuntime(definition, {}) as runtime:
            # a large buffer: an unsigned binary body would be written in parts
            assert await runtime.call("w", tasks.add, b"a" * 300_000, b"b") is None
    return captured


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_our_signed_requests_verify_with_wove2(wove2_python: Path, secret_env: str, binary: bool) -> None:
    """The signature covers the exact body, JSON or binary frames (checked by Wove 2.0.3's verifier)."""
    captured = run(_capture_signed_request(secret_env, binary))
    assert captured.pop("binary") is binary
    assert captured["target"] == "/wove/signed"
    result = subprocess.run([str(wove2_python), "-c", WOVE2_VERIFY, SECRET], input=json.dumps(captured),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"valid": "ok", "tampered": "rejected"}
