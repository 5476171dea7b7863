"""The ASGI worker service: status codes, response shapes, limits, mounting."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from wove.environment import ExecutorRuntime
from wove.protocol import decode_events, encode_frame
from wove.testing import tasks
from wove_executor_http.server import create_app

from .conftest import Worker, serve_asgi

pytestmark = pytest.mark.integration


def _frame(func: Any = tasks.add, **args: Any) -> dict[str, Any]:
    name = func.__name__
    return {"type": "run_task", "run_id": f"{name}:{uuid.uuid4().hex}", "task_id": name, "callable": func,
            "args": args, "delivery": {}}


@pytest.fixture(scope="module")
def small_worker() -> Iterator[Worker]:
    service = Worker("--max-body-bytes", "2000")
    yield service
    service.stop()


async def _post(url: str, body: bytes, **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=20) as client:
        return await client.post(url, content=body, headers={"content-type": "application/json", **headers})


async def test_plain_json_answer_for_wove2_clients(worker: Worker) -> None:
    response = await _post(worker.url, encode_frame(_frame(a=2, b=3)), accept="application/json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert [e["type"] for e in body["events"]] == ["task_started", "task_result"]
    assert decode_events(response.content)[-1]["result"] == 5


async def test_ndjson_answer(worker: Worker) -> None:
    response = await _post(worker.url, encode_frame(_frame(a=2, b=3)), accept="application/x-ndjson")
    assert response.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in response.content.splitlines()]
    assert [e["type"] for e in lines] == ["task_started", "task_result"]


async def test_body_over_the_limit_is_413(small_worker: Worker, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    body = encode_frame(_frame(tasks.write_marker, path=str(marker) + "x" * 3000))
    response = await _post(small_worker.url, body)
    assert response.status_code == 413
    assert "2000" in response.json()["error"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit applies while reading
        for _ in range(10):
            yield b" " * 1000

    async with httpx.AsyncClient(timeout=20) as client:
        try:
            response = await client.post(small_worker.url, content=chunks())
            assert response.status_code == 413
        except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
            pass  # the worker answered 413 and closed while the client was still writing
    assert not marker.exists()


@pytest.mark.parametrize(("body", "needle"), [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"type": "launch_missiles"}', "Unknown command type"),
    (b'{"type": "run_task", "task_id": "x", "callable_pickle": "gA=="}', "run_id"),
])
async def test_malformed_commands_are_400(worker: Worker, body: bytes, needle: str) -> None:
    response = await _post(worker.url, body)
    assert response.status_code == 400
    assert needle in response.json()["error"]


async def test_run_task_with_a_bad_pickle_answers_its_task_error(worker: Worker) -> None:
    body = json.dumps({"type": "run_task", "run_id": "t:1", "task_id": "t", "callable_pickle": "!!notbase64",
                       "delivery": {}}).encode()
    response = await _post(worker.url, body)
    assert response.status_code == 200
    [event] = decode_events(response.content)
    assert event["type"] == "task_error" and event["run_id"] == "t:1"
    assert "callable_pickle" in event["error"]["message"]


async def test_methods_paths_and_health(worker: Worker) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        assert (await client.get(worker.url)).status_code == 405
        assert (await client.get(worker.url)).headers["allow"] == "POST"
        assert (await client.post(worker.url.replace("/wove", "/elsewhere"), content=b"{}")).status_code == 404
        health = await client.get(worker.url + "/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert (await client.get(worker.url.replace("/wove", "/healthz"))).status_code == 200


async def test_cancel_and_shutdown_answer_at_once(worker: Worker) -> None:
    cancel = {"type": "cancel_task", "run_id": "nothing:1", "task_id": "nothing"}
    response = await _post(worker.url, json.dumps(cancel).encode())
    assert response.status_code == 200 and response.json() == {"events": []}
    response = await _post(worker.url, b'{"type": "shutdown"}')
    assert response.status_code == 200 and response.json() == {"events": []}
    # the shared service ignored the shutdown: it still runs tasks
    response = await _post(worker.url, encode_frame(_frame(a=1, b=1)))
    assert decode_events(response.content)[-1]["result"] == 2


async def test_twenty_mebibyte_arguments_and_result(worker: Worker) -> None:
    payload = b"x" * (20 * 1024 * 1024)
    definition = {"executor": "http", "executor_config": {"url": worker.url}}
    async with ExecutorRuntime({"w": definition}, {}) as runtime:
        assert await runtime.call("w", tasks.echo, payload) == payload


async def test_mounted_under_starlette(secret_env: str) -> None:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    worker_app = create_app(security=f"env:{secret_env}")

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        yield
        await worker_app.shutdown()

    async def home(_: Any) -> PlainTextResponse:
        return PlainTextResponse("home")

    host = Starlette(routes=[Route("/", home), Mount("/workers", app=worker_app)], lifespan=lifespan)
    async with serve_asgi(host) as port:
        url = f"http://127.0.0.1:{port}/workers/wove"
        definition = {"executor": "http", "executor_config": {"url": url, "security": f"env:{secret_env}"}}
        async with ExecutorRuntime({"w": definition}, {}) as runtime:
            assert await runtime.call("w", tasks.add, 20, 22) == 42
            assert await runtime.call_with("w", tasks.sleep, (0.5,), delivery_heartbeat_seconds=0.3) == "slept"
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"http://127.0.0.1:{port}/")).text == "home"
            assert (await client.get(f"{url}/health")).status_code == 200
            assert (await client.post(url, content=b"{}")).status_code == 401
