"""Probes and Prometheus metrics of ``wove worker http``, scraped with httpx from real services."""

from __future__ import annotations

import asyncio
import queue
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from wove.environment import EnvironmentExecutionError, ExecutorRuntime
from wove.protocol import decode_events, encode_frame
from wove.security import NetworkExecutorSecurity, canonical_http_target
from wove.testing import tasks

from .conftest import SECRET, SECRET_ENV, Worker

pytestmark = pytest.mark.integration


def _sample(text: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus text exposition."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"no sample {name} {labels} in the exposition")


def _base(url: str) -> str:
    return url.rsplit("/", 1)[0]


def _frame(func: Any, **args: Any) -> bytes:
    name = func.__name__
    return encode_frame({"type": "run_task", "run_id": f"{name}:{uuid.uuid4().hex}", "task_id": name,
                         "callable": func, "args": args, "delivery": {}})


class MetricsWorker:
    """``wove worker http --port 0 --metrics-port 0 ARGS``: its URL and its metrics URL."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wove.cli", "worker", "http", "--port", "0", "--metrics-port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in iter(self.proc.stdout.readline, "")],  # type: ignore[union-attr]
                         daemon=True).start()
        try:
            ready, announced = lines.get(timeout=30), lines.get(timeout=10)
        except queue.Empty:
            self.proc.kill()
            raise RuntimeError("wove worker http --metrics-port 0 did not announce itself") from None
        assert ready.startswith("listening on ") and announced.startswith("metrics on "), (ready, announced)
        self.url = ready.split("listening on ", 1)[1].strip()
        self.metrics_url = announced.split("metrics on ", 1)[1].strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def metered() -> Iterator[Worker]:
    """A signed worker serving /metrics on its own port (``--metrics``)."""
    service = Worker("--security", f"env:{SECRET_ENV}", "--metrics", env={SECRET_ENV: SECRET})
    yield service
    service.stop()


async def test_probes_answer_without_credentials_and_name_no_task(metered: Worker) -> None:
    base = _base(metered.url)
    async with httpx.AsyncClient(timeout=10) as client:
        for path in ("/healthz", "/readyz", "/wove/healthz", "/wove/readyz"):
            response = await client.get(base + path)
            assert response.status_code == 200, path
            assert response.json()["status"] == "ok"
            assert set(response.json()) == {"status", "active", "capabilities"}
        assert (await client.head(base + "/readyz")).status_code == 200
        assert (await client.post(base + "/readyz")).status_code == 405
        scraped = await client.get(base + "/metrics")
        assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
        assert _sample(scraped.text, "wove_worker_ready") == 1
        assert _sample(scraped.text, "wove_worker_info", service="http", version=_version()) == 1
        assert "run_id" not in scraped.text and "task_id" not in scraped.text


def _version() -> str:
    from importlib import metadata

    return metadata.version("wove-core")


async def test_metrics_count_runs_by_outcome(metered: Worker, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    metrics = _base(metered.url) + "/metrics"
    async with httpx.AsyncClient(timeout=10) as client:
        before = (await client.get(metrics)).text
        definition = {"executor": "http", "executor_config": {"url": metered.url, "security": f"env:{SECRET_ENV}"}}
        async with ExecutorRuntime({"w": definition}, {}) as runtime:
            assert await runtime.call("w", tasks.add, 2, 3) == 5
            assert await runtime.call("w", tasks.add, 4, 5) == 9
            with pytest.raises((tasks.ContractTaskError, EnvironmentExecutionError)):
                await runtime.call("w", tasks.fail, "boom")
        after = (await client.get(metrics)).text

    def grew(name: str, **labels: str) -> float:
        return _sample(after, name, **labels) - _sample(before, name, **labels)

    assert grew("wove_worker_runs_completed_total", outcome="result") == 2
    assert grew("wove_worker_runs_completed_total", outcome="error") == 1
    assert grew("wove_worker_runs_completed_total", outcome="cancelled") == 0
    assert grew("wove_worker_runs_accepted_total") == 3
    assert grew("wove_worker_run_duration_seconds_count", outcome="result") == 2
    assert grew("wove_worker_sessions_total") >= 3  # one per request
    assert grew("wove_worker_connections_total") >= 1
    assert _sample(after, "wove_worker_runs_in_flight") == 0


async def test_a_bad_signature_and_a_replay_are_counted_by_reason(metered: Worker) -> None:
    metrics = _base(metered.url) + "/metrics"
    body = _frame(tasks.add, a=1, b=1)
    headers = NetworkExecutorSecurity(mode="signed", secret=SECRET).headers_for(
        transport="http", target=canonical_http_target(metered.url), body=body)
    forged = {**headers, "X-Wove-Signature": "v1=" + "0" * 64}
    async with httpx.AsyncClient(timeout=10) as client:
        before = (await client.get(metrics)).text
        assert (await client.post(metered.url, content=body, headers=forged)).status_code == 403
        assert (await client.post(metered.url, content=body, headers=headers)).status_code == 200
        assert (await client.post(metered.url, content=body, headers=headers)).status_code == 403  # the same nonce
        # no credentials: refused from the headers and the connection closed; an empty body
        # leaves nothing unread for the close to reset
        assert (await client.post(metered.url, content=b"")).status_code == 401
        after = (await client.get(metrics)).text
    for reason in ("bad_credentials", "replay", "unauthenticated"):
        grew = (_sample(after, "wove_worker_rejected_total", reason=reason)
                - _sample(before, "wove_worker_rejected_total", reason=reason))
        assert grew == 1, reason


async def _poll(client: httpx.AsyncClient, url: str, status: int, timeout: float = 20.0) -> httpx.Response:
    async def wait() -> httpx.Response:
        while True:
            response = await client.get(url)
            if response.status_code == status:
                return response
            await asyncio.sleep(0.05)

    return await asyncio.wait_for(wait(), timeout)


@pytest.mark.timeout(90)
async def test_not_ready_while_draining_a_run_in_flight_still_live() -> None:
    worker = MetricsWorker("--grace", "30")
    base = _base(worker.url)
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            assert (await client.get(base + "/readyz")).status_code == 200
            assert (await client.get(base + "/metrics")).status_code == 404  # metrics have their own port
            running = asyncio.ensure_future(client.post(worker.url, content=_frame(tasks.sleep, seconds=4)))

            async def in_flight() -> None:
                while _sample((await client.get(worker.metrics_url)).text, "wove_worker_runs_in_flight") < 1:
                    await asyncio.sleep(0.05)

            await asyncio.wait_for(in_flight(), 20)
            worker.proc.send_signal(signal.SIGTERM)
            draining = await _poll(client, base + "/readyz", 503)
            assert draining.json()["status"] == "closing"
            assert (await client.get(base + "/healthz")).status_code == 200  # alive: the drain is working
            scraped = (await client.get(worker.metrics_url)).text
            assert _sample(scraped, "wove_worker_ready") == 0
            assert _sample(scraped, "wove_worker_runs_in_flight") == 1
            answer = await asyncio.wait_for(running, 30)
            assert decode_events(answer.content)[-1]["type"] == "task_result"  # the drain let it finish
        assert await asyncio.to_thread(worker.proc.wait, 30) == 0
    finally:
        worker.stop()
