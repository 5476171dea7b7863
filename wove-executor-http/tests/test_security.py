"""Requests that fail authentication get 401/403 and execute nothing."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from wove.environment import ExecutorRuntime
from wove.errors import EnvironmentExecutionError
from wove.protocol import decode_events, encode_frame
from wove.security import NetworkExecutorSecurity, canonical_http_target
from wove.testing import tasks
from wove_executor_http.plugin import serve_in_background
from wove_executor_http.server import create_app

from .conftest import SECRET

pytestmark = pytest.mark.integration


def _marker_frame(marker: Path) -> bytes:
    # a fresh run id each time: the worker answers a repeated run id from its cache
    return encode_frame({"type": "run_task", "run_id": f"write_marker:{uuid.uuid4().hex}", "task_id": "write_marker",
                         "callable": tasks.write_marker, "args": {"path": str(marker)}, "delivery": {}})


def _signed(url: str, body: bytes, secret: str = SECRET, **changes: str) -> dict[str, str]:
    security = NetworkExecutorSecurity(mode="signed", secret=secret)
    headers = security.headers_for(transport="http", target=canonical_http_target(url), body=body)
    headers.update(changes)
    return headers


async def _post(url: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.post(url, content=body, headers={"content-type": "application/json", **headers})


async def test_valid_signature_runs(signed_worker: Any, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    body = _marker_frame(marker)
    response = await _post(signed_worker.url, body, _signed(signed_worker.url, body))
    assert response.status_code == 200
    assert decode_events(response.content)[-1]["result"] == str(marker)
    assert marker.exists()


@pytest.mark.parametrize("case", ["missing", "tampered", "wrong_secret", "expired", "future", "wrong_key", "replayed"])
async def test_bad_requests_are_rejected_and_run_nothing(signed_worker: Any, tmp_path: Path, case: str) -> None:
    marker = tmp_path / "ran"
    body = _marker_frame(marker)
    url = signed_worker.url
    expected = 403
    if case == "missing":
        headers: dict[str, str] = {}
        expected = 401
    elif case == "tampered":
        headers = _signed(url, body)
        body = body.replace(b'"task_id":"write_marker"', b'"task_id":"write_markeR"')
    elif case == "wrong_secret":
        headers = _signed(url, body, secret="not the secret")
    elif case in ("expired", "future"):
        security = NetworkExecutorSecurity(mode="signed", secret=SECRET)
        stamp = time.time() + (-3600 if case == "expired" else 3600)
        with pytest.MonkeyPatch.context() as clock:  # a client whose clock is an hour off
            clock.setattr(time, "time", lambda: stamp)
            headers = security.headers_for(transport="http", target=canonical_http_target(url), body=body)
        assert headers["X-Wove-Timestamp"] == str(int(stamp))
    elif case == "wrong_key":
        headers = _signed(url, body, **{"X-Wove-Key": "other"})
    else:  # replayed: the first one runs (then remove its marker), the copy must not
        headers = _signed(url, body)
        first = await _post(url, body, headers)
        assert first.status_code == 200
        marker.unlink()
    response = await _post(url, body, headers)
    assert response.status_code == expected, response.text
    assert ("Missing" if expected == 401 else "rejected") in response.json()["error"]  # the session's wording
    assert not marker.exists(), "a rejected request must execute nothing"


async def test_wrong_secret_from_the_executor_is_a_transport_error(signed_worker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WRONG_SECRET", "nope")
    definition = {"executor": "http", "executor_config": {"url": signed_worker.url, "security": "env:WRONG_SECRET"}}
    async with ExecutorRuntime({"w": definition}, {}) as runtime:
        with pytest.raises(EnvironmentExecutionError) as info:
            await runtime.call("w", tasks.add, 1, 2)
    message = str(info.value)
    assert signed_worker.url in message and "403" in message and "Invalid signature" in message
    assert "nope" not in message


async def test_missing_secret_variable_fails_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WOVE_UNSET_SECRET", raising=False)
    definition = {"executor": "http", "executor_config": {"url": "http://127.0.0.1:9/wove",
                                                          "security": "env:WOVE_UNSET_SECRET"}}
    with pytest.raises(RuntimeError, match="WOVE_UNSET_SECRET"):
        async with ExecutorRuntime({"w": definition}, {}) as runtime:
            await runtime.call("w", tasks.add, 1, 2)


async def test_bearer_token(tmp_path: Path) -> None:
    app = create_app(security={"type": "bearer", "token": "s3cret-token"})
    async with serve_in_background(app) as url:
        good = {"executor": "http", "executor_config": {"url": url, "security": {"type": "bearer", "token": "s3cret-token"}}}
        async with ExecutorRuntime({"w": good}, {}) as runtime:
            assert await runtime.call("w", tasks.add, 2, 3) == 5
            assert await runtime.call_with("w", tasks.sleep, (0.6,), delivery_heartbeat_seconds=0.3) == "slept"
        marker = tmp_path / "ran"
        body = _marker_frame(marker)
        anonymous = await _post(url, body, {})
        assert anonymous.status_code == 401
        assert anonymous.headers["www-authenticate"] == "Bearer"  # the scheme this worker wants
        assert (await _post(url, body, {"Authorization": "Bearer wrong"})).status_code == 403
        assert not marker.exists()
