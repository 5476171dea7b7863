"""Probes and Prometheus metrics of ``wove worker websocket``: plain HTTP on the WebSocket
port, asked with httpx of real services."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from wove.environment import EnvironmentExecutionError, ExecutorRuntime
from wove.protocol import decode_events, encode_frame
from wove.security import NetworkExecutorSecurity, canonical_http_target
from wove.testing import tasks

from .conftest import SECRET, SECRET_ENV, WorkerProcess

pytestmark = pytest.mark.integration


def _sample(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"no sample {name} {labels} in the exposition")


def _http(url: str) -> str:
    """The plain-HTTP root of a ``ws://HOST:PORT/path`` worker."""
    return "http://" + url.split("://", 1)[1].split("/", 1)[0]


def _command(func: Any, **args: Any) -> bytes:
    name = func.__name__
    return encode_frame({"type": "run_task", "run_id": f"{name}:{uuid.uuid4().hex}", "task_id": name,
                         "callable": func, "args": args, "delivery": {}})


def _version() -> str:
    from importlib import metadata

    return metadata.version("wove-core")


@pytest.fixture(scope="module")
def metered() -> Iterator[WorkerProcess]:
    worker = WorkerProcess("--security", f"env:{SECRET_ENV}", "--metrics", env={SECRET_ENV: SECRET})
    worker.start(0)
    yield worker
    worker.stop()


async def test_probes_are_plain_http_on_the_websocket_port(metered: WorkerProcess) -> None:
    root = _http(metered.url)
    async with httpx.AsyncClient(timeout=10) as client:
        for path in ("/healthz", "/readyz"):
            response = await client.get(root + path)
            assert response.status_code == 200, path
            assert response.headers["content-type"] == "application/json"
            assert response.json()["status"] == "ok"
            assert set(response.json()) == {"status", "active", "capabilities"}
        scraped = await client.get(root + "/metrics")
        assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
        assert _sample(scraped.text, "wove_worker_info", service="websocket", version=_version()) == 1
        assert _sample(scraped.text, "wove_worker_ready") == 1
        assert (await client.get(root + "/elsewhere")).status_code == 404


async def test_metrics_count_runs_connections_and_a_bad_handshake(metered: WorkerProcess,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    metrics = _http(metered.url) + "/metrics"
    async with httpx.AsyncClient(timeout=10) as client:
        before = (await client.get(metrics)).text
        definition = {"executor": "websocket", "executor_config": {"url": metered.url,
                                                                    "security": f"env:{SECRET_ENV}"}}
        async with ExecutorRuntime({"ws": definition}, {}) as runtime:
            assert await runtime.call("ws", tasks.add, 2, 3) == 5
            assert await runtime.call("ws", tasks.add, 3, 4) == 7
            with pytest.raises((tasks.ContractTaskError, EnvironmentExecutionError)):
                await runtime.call("ws", tasks.fail, "boom")
            during = (await client.get(metrics)).text
        forged = NetworkExecutorSecurity(mode="signed", secret="not the secret").headers_for(
            transport="websocket", target=canonical_http_target(metered.url), body=b"")
        with pytest.raises(InvalidStatus) as refused:
            async with connect(metered.url, additional_headers=forged):
                pass
        assert refused.value.response.status_code == 403

        async def closed() -> str:
            while True:
                text = (await client.get(metrics)).text
                if _sample(text, "wove_worker_connections_open") == 0:
                    return text
                await asyncio.sleep(0.05)

        after = await asyncio.wait_for(closed(), 10)

    def grew(name: str, **labels: str) -> float:
        return _sample(after, name, **labels) - _sample(before, name, **labels)

    assert grew("wove_worker_runs_completed_total", outcome="result") == 2
    assert grew("wove_worker_runs_completed_total", outcome="error") == 1
    assert grew("wove_worker_run_duration_seconds_count", outcome="result") == 2
    assert grew("wove_worker_rejected_total", reason="bad_credentials") == 1
    assert grew("wove_worker_connections_total") >= 1
    assert _sample(during, "wove_worker_connections_open") >= 1
    assert _sample(during, "wove_worker_sessions_open") >= 1


@pytest.mark.timeout(90)
async def test_not_ready_while_draining_a_run_in_flight_still_live() -> None:
    worker = WorkerProcess("--grace", "30")
    worker.start(0)
    root = _http(worker.url)
    try:
        async with httpx.AsyncClient(timeout=10) as client, connect(worker.url) as ws:
            assert (await client.get(root + "/readyz")).status_code == 200
            assert (await client.get(root + "/metrics")).status_code == 404  # not asked for
            await ws.send(_command(tasks.sleep, seconds=4).decode())
            first = decode_events(await asyncio.wait_for(ws.recv(), 20))
            assert first[0]["type"] == "task_started"
            assert worker.proc is not None
            worker.proc.send_signal(signal.SIGTERM)

            async def not_ready() -> httpx.Response:
                while True:
                    response = await client.get(root + "/readyz")
                    if response.status_code == 503:
                        return response
                    await asyncio.sleep(0.05)

            draining = await asyncio.wait_for(not_ready(), 20)
            assert json.loads(draining.text)["status"] == "closing"
            assert (await client.get(root + "/healthz")).status_code == 200  # alive: the drain is working
            events: list[dict[str, Any]] = []
            while not any(e["type"] in ("task_result", "task_error", "task_cancelled") for e in events):
                events += decode_events(await asyncio.wait_for(ws.recv(), 30))
            assert events[-1]["type"] == "task_result"  # the drain let it finish
        assert await asyncio.to_thread(worker.proc.wait, 30) == 0
    finally:
        worker.kill()


async def test_a_message_over_the_limit_is_counted_as_too_large() -> None:
    worker = WorkerProcess("--metrics", "--max-body-bytes", "2000")
    worker.start(0)
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            metrics = _http(worker.url) + "/metrics"
            async with connect(worker.url) as ws:
                await ws.send("x" * 5000)
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(ws.recv(), 10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009

            async def counted() -> float:
                while True:
                    value = _sample((await client.get(metrics)).text, "wove_worker_rejected_total", reason="too_large")
                    if value:
                        return value
                    await asyncio.sleep(0.05)

            assert await asyncio.wait_for(counted(), 10) == 1
    finally:
        worker.stop()
