"""``grpc.health.v1.Health`` and Prometheus metrics of ``wove worker grpc``, asked with a real
gRPC health client and httpx of real services."""

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

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from wove.environment import EnvironmentExecutionError, ExecutorRuntime
from wove.protocol import decode_events, encode_frame
from wove.security import NetworkExecutorSecurity
from wove.testing import tasks
from wove_executor_grpc.server import LIVENESS_SERVICE, SEND_METHOD, SERVICE

pytestmark = pytest.mark.integration

SECRET_ENV = "WOVE_GRPC_HEALTH_SECRET"
SECRET = "health check secret"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class MetricsWorker:
    """``wove worker grpc --port 0 --metrics-port 0 ARGS``: its target and its metrics URL."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        import os

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wove.cli", "worker", "grpc", "--port", "0", "--metrics-port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, **(env or {})})
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in iter(self.proc.stdout.readline, "")],  # type: ignore[union-attr]
                         daemon=True).start()
        try:
            ready, announced = lines.get(timeout=30), lines.get(timeout=10)
        except queue.Empty:
            self.proc.kill()
            raise RuntimeError("wove worker grpc --metrics-port 0 did not announce itself") from None
        assert ready.startswith("listening on ") and announced.startswith("metrics on "), (ready, announced)
        self.target = ready.split("listening on ", 1)[1].strip()
        self.metrics_url = announced.split("metrics on ", 1)[1].strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def _sample(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"no sample {name} {labels} in the exposition")


def _command(func: Any, **args: Any) -> bytes:
    name = func.__name__
    return encode_frame({"type": "run_task", "run_id": f"{name}:{uuid.uuid4().hex}", "task_id": name,
                         "callable": func, "args": args, "delivery": {}})


async def _status(target: str, service: str) -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        return int(response.status)


@pytest.fixture(scope="module")
def signed() -> Iterator[MetricsWorker]:
    worker = MetricsWorker("--security", f"env:{SECRET_ENV}", env={SECRET_ENV: SECRET})
    yield worker
    worker.stop()


async def test_health_service_needs_no_signature(signed: MetricsWorker) -> None:
    for name in ("", SERVICE, LIVENESS_SERVICE):
        assert await _status(signed.target, name) == SERVING, name
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await _status(signed.target, "no.such.Service")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


async def test_metrics_count_runs_by_outcome_and_refusals_by_reason(signed: MetricsWorker,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    async with httpx.AsyncClient(timeout=10) as client:
        before = (await client.get(signed.metrics_url)).text
        definition = {"executor": "grpc", "executor_config": {"target": signed.target, "security": f"env:{SECRET_ENV}"}}
        async with ExecutorRuntime({"g": definition}, {}) as runtime:
            assert await runtime.call("g", tasks.add, 2, 3) == 5
            with pytest.raises((tasks.ContractTaskError, EnvironmentExecutionError)):
                await runtime.call("g", tasks.fail, "boom")
        body = _command(tasks.add, a=1, b=1)
        metadata = NetworkExecutorSecurity(mode="signed", secret="not the secret").metadata_for(
            transport="grpc", target=SEND_METHOD, body=body)
        async with grpc.aio.insecure_channel(signed.target) as channel:
            send = channel.unary_unary(SEND_METHOD)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await send(body, metadata=metadata, timeout=10)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        after = (await client.get(signed.metrics_url)).text

    def grew(name: str, **labels: str) -> float:
        return _sample(after, name, **labels) - _sample(before, name, **labels)

    assert grew("wove_worker_runs_completed_total", outcome="result") == 1
    assert grew("wove_worker_runs_completed_total", outcome="error") == 1
    assert grew("wove_worker_run_duration_seconds_count", outcome="error") == 1
    assert grew("wove_worker_rejected_total", reason="bad_credentials") == 1
    assert grew("wove_worker_sessions_total") >= 1  # the executor multiplexes its runs on one Session call
    assert _sample(after, "wove_worker_info", service="grpc", version=_version()) == 1
    assert _sample(after, "wove_worker_runs_in_flight") == 0


def _version() -> str:
    from importlib import metadata

    return metadata.version("wove-core")


@pytest.mark.timeout(90)
async def test_not_serving_while_draining_a_run_in_flight_liveness_still_serving() -> None:
    worker = MetricsWorker("--grace", "30")
    try:
        assert await _status(worker.target, "") == SERVING
        async with grpc.aio.insecure_channel(worker.target) as channel, httpx.AsyncClient(timeout=10) as client:
            send = channel.unary_unary(SEND_METHOD)
            running = asyncio.ensure_future(send(_command(tasks.sleep, seconds=4), timeout=60))

            async def in_flight() -> None:
                while _sample((await client.get(worker.metrics_url)).text, "wove_worker_runs_in_flight") < 1:
                    await asyncio.sleep(0.05)

            await asyncio.wait_for(in_flight(), 20)
            worker.proc.send_signal(signal.SIGTERM)

            async def not_serving() -> None:
                while await _status(worker.target, "") != NOT_SERVING:
                    await asyncio.sleep(0.05)

            await asyncio.wait_for(not_serving(), 20)
            assert await _status(worker.target, SERVICE) == NOT_SERVING
            assert await _status(worker.target, LIVENESS_SERVICE) == SERVING
            assert _sample((await client.get(worker.metrics_url)).text, "wove_worker_ready") == 0
            answer = await asyncio.wait_for(running, 30)
            assert decode_events(answer)[-1]["type"] == "task_result"  # the drain let it finish
        assert await asyncio.to_thread(worker.proc.wait, 30) == 0
    finally:
        worker.stop()
