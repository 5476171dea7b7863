"""The http executor against real services: load, TLS, failures in transit, re-delivery."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import pytest

from wove.environment import ExecutorRuntime
from wove.errors import DeliveryTimeoutError, EnvironmentExecutionError
from wove.testing import tasks
from wove_executor_http import HttpEnvironmentExecutor
from wove_executor_http.plugin import serve_in_background
from wove_executor_http.server import create_app

from .conftest import Worker, serve_asgi

pytestmark = pytest.mark.integration


def _env(url: str, **config: Any) -> dict[str, Any]:
    return {"w": {"executor": "http", "executor_config": {"url": url, **config}}}


async def test_two_thousand_tasks_with_256_in_flight(worker: Worker) -> None:
    definition = _env(worker.url)
    definition["w"]["delivery_max_in_flight"] = 256
    async with ExecutorRuntime(definition, {}) as runtime:
        results = await asyncio.gather(*(runtime.call("w", tasks.add, i, 1) for i in range(2000)))
    assert results == [i + 1 for i in range(2000)]


async def test_sleeping_tasks_run_concurrently(worker: Worker) -> None:
    async with ExecutorRuntime(_env(worker.url), {}) as runtime:
        results = await asyncio.gather(*(runtime.call("w", tasks.sleep, 0.5) for _ in range(64)))
    assert results == ["slept"] * 64


async def test_heartbeats_stream_under_a_short_window(worker: Worker) -> None:
    async with ExecutorRuntime(_env(worker.url), {}) as runtime:
        assert await runtime.call_with("w", tasks.sleep, (1.2,), delivery_heartbeat_seconds=0.3) == "slept"


async def test_timeout_cancels_the_run_on_the_worker(worker: Worker, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    async with ExecutorRuntime(_env(worker.url), {}) as runtime:
        with pytest.raises(DeliveryTimeoutError):
            await runtime.call_with("w", tasks.sleep, (1.0, str(marker)), delivery_timeout=0.3,
                                    delivery_cancel_mode="require_ack")
        await asyncio.sleep(1.2)
    assert not marker.exists(), "the cancel_task must reach the worker and stop the run"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("transport", ["native", "aiohttp", "httpx"])
async def test_connection_refused_says_so_and_names_the_url(transport: str) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}/wove"
    async with ExecutorRuntime(_env(url, transport=transport), {}) as runtime:
        with pytest.raises(EnvironmentExecutionError) as info:
            await runtime.call("w", tasks.add, 1, 2)
        message = str(info.value)
        assert f"connection refused at {url}" in message, message
        assert "Is the worker service running?" in message and f"--port {port}" in message
        assert "ConnectTimeout" not in message
        assert info.value.payload["source"] == "transport"
        assert info.value.payload["kind"] == "ConnectionRefused"
        with pytest.raises(EnvironmentExecutionError):  # still usable: the next call fails the same way
            await runtime.call("w", tasks.add, 1, 2)


async def test_requeue_waits_reconnect_timeout_for_an_unreachable_worker() -> None:
    url = f"http://127.0.0.1:{_free_port()}/wove"
    config = {"max_deliveries": 3, "reconnect_timeout": 0.5, "reconnect_initial_delay": 0.05}
    async with ExecutorRuntime(_env(url, **config), {}) as runtime:
        with pytest.raises(EnvironmentExecutionError) as info:
            await runtime.call_with("w", tasks.add, (1, 2), delivery_orphan_policy="requeue")
    message = str(info.value)
    assert "did not come back within executor_config.reconnect_timeout=0.5s" in message, message
    assert f"connection refused at {url}" in message


@pytest.mark.parametrize(("config", "error"), [
    ({"reconnect_timeout": -1}, "reconnect_timeout must be a non-negative number"),
    ({"retry_backoff": "fast"}, "retry_backoff must be a non-negative number"),
    ({"retry_backoff": 0.1, "reconnect_initial_delay": 0.1}, "both 'reconnect_initial_delay' and its older spelling"),
    ({"max_deliveries": 0}, "max_deliveries must be a positive integer"),
])
async def test_redelivery_policy_is_checked_at_start(config: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        await HttpEnvironmentExecutor().start(environment_name="e", run_config={},
                                              environment_config={"url": "http://127.0.0.1:1/wove", **config})


async def test_requeue_reaches_a_worker_that_comes_up() -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}/wove"

    async def late_worker() -> Any:
        await asyncio.sleep(0.3)
        return serve_in_background(create_app(), port=port)

    async with ExecutorRuntime(_env(url, max_deliveries=10, retry_backoff=0.1), {}) as runtime:
        call = asyncio.ensure_future(runtime.call_with("w", tasks.add, (1, 2), delivery_orphan_policy="requeue"))
        async with await late_worker():
            assert await asyncio.wait_for(call, 20) == 3


def _app(status: int, body: bytes, content_type: bytes = b"application/json") -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type)]})
        await send({"type": "http.response.body", "body": body})

    return app


@pytest.mark.parametrize(("status", "body", "content_type", "needle"), [
    (500, b"internal trouble", b"text/plain", "HTTP 500"),
    (200, b"<html>hello</html>", b"text/html", "invalid answer"),
    (200, b'{"type": "task_result", "run_id": "someone:else", "task_id": "x"}', b"application/json", "names run"),
])
async def test_bad_answers_are_transport_errors(status: int, body: bytes, content_type: bytes, needle: str) -> None:
    async with serve_asgi(_app(status, body, content_type)) as port:
        url = f"http://127.0.0.1:{port}/wove"
        async with ExecutorRuntime(_env(url), {}) as runtime:
            with pytest.raises(EnvironmentExecutionError) as info:
                await runtime.call("w", tasks.add, 1, 2)
    assert needle in str(info.value) and url in str(info.value)


async def test_stream_without_terminal_is_redelivered_then_fails() -> None:
    hits: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        frame = json.loads((await receive())["body"])
        hits.append(1)
        line = json.dumps({"type": "task_started", "run_id": frame["run_id"], "task_id": frame["task_id"]})
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/x-ndjson")]})
        await send({"type": "http.response.body", "body": line.encode() + b"\n"})

    async with serve_asgi(app) as port:
        url = f"http://127.0.0.1:{port}/wove"
        async with ExecutorRuntime(_env(url, max_deliveries=2, retry_backoff=0.01), {}) as runtime:
            with pytest.raises(EnvironmentExecutionError, match="without a terminal event"):
                await runtime.call_with("w", tasks.add, (1, 2), delivery_orphan_policy="requeue")
            with pytest.raises(EnvironmentExecutionError, match="without a terminal event"):
                await runtime.call("w", tasks.add, 1, 2)
    assert len(hits) == 3  # two deliveries of the requeue run, one of the other


async def test_worker_killed_mid_run_is_a_transport_error() -> None:
    service = Worker()
    try:
        async with ExecutorRuntime(_env(service.url), {}) as runtime:
            call = asyncio.ensure_future(runtime.call("w", tasks.sleep, 5.0))
            await asyncio.sleep(0.5)
            service.proc.kill()
            with pytest.raises(EnvironmentExecutionError) as info:
                await asyncio.wait_for(call, 10)
            assert service.url in str(info.value)
            assert info.value.payload["kind"] == "ConnectionLost", info.value.payload
    finally:
        service.stop()


@pytest.mark.parametrize("transport", ["native", "aiohttp", "httpx"])
async def test_requeue_survives_a_worker_killed_mid_run_and_back_later(transport: str) -> None:
    """A requeue run without an idempotency key is delivered again to the restarted
    worker (same port, back after a few seconds); cancel and fail runs end with a
    transport task_error."""
    service = Worker()
    try:
        async with ExecutorRuntime(_env(service.url, transport=transport), {}) as runtime:
            calls = {policy: asyncio.ensure_future(runtime.call_with("w", tasks.sleep, (1.5,),
                                                                     delivery_orphan_policy=policy))
                     for policy in ("requeue", "cancel", "fail")}
            await asyncio.sleep(0.5)
            service.kill()
            for policy in ("cancel", "fail"):
                with pytest.raises(EnvironmentExecutionError) as info:
                    await asyncio.wait_for(calls[policy], 10)
                assert info.value.payload["source"] == "transport", info.value.payload
                assert service.url in str(info.value)
            assert not calls["requeue"].done()
            await asyncio.sleep(2.0)  # the outage outlasts the first back-offs
            await asyncio.to_thread(service.start)
            assert await asyncio.wait_for(calls["requeue"], 30) == "slept"
    finally:
        service.stop()


async def test_https_with_a_self_signed_certificate(tmp_path: Path, secret_env: str) -> None:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    for blob in cert.cert_chain_pems[1:]:
        blob.write_to_path(str(cert_file), append=True)
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    service = Worker("--certfile", str(cert_file), "--keyfile", str(key_file), "--security", f"env:{secret_env}")
    try:
        assert service.url.startswith("https://127.0.0.1:")
        security = f"env:{secret_env}"
        for name in ("https", "http"):
            definition = {"w": {"executor": name, "executor_config": {"url": service.url, "verify": str(ca_file),
                                                                      "security": security}}}
            async with ExecutorRuntime(definition, {}) as runtime:
                assert await runtime.call("w", tasks.add, 40, 2) == 42
        # without the CA the certificate is refused: a transport error that says so, not a hang
        for transport in ("native", "aiohttp", "httpx"):
            async with ExecutorRuntime(_env(service.url, security=security, transport=transport), {}) as runtime:
                with pytest.raises(EnvironmentExecutionError) as info:
                    await runtime.call("w", tasks.add, 1, 1)
            message = str(info.value)
            assert f"TLS certificate verify failed for {service.url}" in message, message
            assert "executor_config.verify" in message and "executor_config.cert" in message
            assert "ConnectTimeout" not in message and info.value.payload["kind"] == "TLSVerifyFailed"
    finally:
        service.stop()


async def test_https_executor_refuses_plain_http() -> None:
    executor = HttpEnvironmentExecutor(require_https=True)
    with pytest.raises(ValueError, match="https://"):
        await executor.start(environment_name="e", environment_config={"url": "http://127.0.0.1:1/wove"}, run_config={})


@pytest.mark.parametrize(("config", "error"), [
    ({"url": "http://workers.example.com/wove"}, "without TLS"),
    ({"url": "https://workers.example.com/wove"}, "without authentication"),
    ({"url": "ftp://127.0.0.1/wove"}, "http:// or https://"),
    ({"url": "http://127.0.0.1/wove", "colour": "blue"}, "key 'colour' is not a http executor option"),
    ({"url": "http://127.0.0.1/wove", "max_connections": 0}, "max_connections"),
    ({"url": "http://127.0.0.1/wove", "verify": "/no/such/ca.pem"}, "does not exist"),
])
async def test_config_is_checked_at_start(config: dict[str, Any], error: str) -> None:
    with pytest.raises((ValueError, TypeError), match=error):
        await HttpEnvironmentExecutor().start(environment_name="e", environment_config=config, run_config={})


async def test_insecure_opt_out_allows_remote_plain_http() -> None:
    executor = HttpEnvironmentExecutor()
    await executor.start(environment_name="e", run_config={},
                         environment_config={"url": "http://workers.example.com/wove", "insecure": True})
    await executor.stop()


async def test_httpx_transport_works_too(worker: Worker) -> None:
    async with ExecutorRuntime(_env(worker.url, transport="httpx"), {}) as runtime:
        assert await runtime.call("w", tasks.add, 1, 2) == 3
        assert await runtime.call_with("w", tasks.sleep, (0.6,), delivery_heartbeat_seconds=0.3) == "slept"


async def test_sigterm_cancels_runs_that_outlive_the_grace_and_exits_0() -> None:
    from wove.testing import collect_events

    service = Worker("--grace", "0.5")  # a 5 s run outlives the drain's grace
    executor = HttpEnvironmentExecutor()
    await executor.start(environment_name="e", environment_config={"url": service.url}, run_config={})
    try:
        frame = {"type": "run_task", "run_id": "sleep:sigterm", "task_id": "sleep", "callable": tasks.sleep,
                 "args": {"seconds": 5.0}, "delivery": {"delivery_orphan_policy": "cancel"}}
        await executor.send(frame)
        await asyncio.sleep(0.5)
        service.proc.terminate()
        events = await collect_events(executor, {"sleep:sigterm"}, timeout=10, linger=0.1)
        assert [e["type"] for e in events if e["type"] != "heartbeat"] == ["task_started", "task_cancelled"]
        assert await asyncio.to_thread(service.proc.wait, 10) == 0
    finally:
        await executor.stop()
        service.stop()


async def test_a_worker_that_never_answers_is_a_timeout() -> None:
    async def silent(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":  # read the request, answer nothing until the client leaves
            while (await receive())["type"] != "http.disconnect":
                pass

    async with serve_asgi(silent) as port:
        url = f"http://127.0.0.1:{port}/wove"
        for transport in ("native", "aiohttp", "httpx"):
            async with ExecutorRuntime(_env(url, timeout=0.3, transport=transport), {}) as runtime:
                with pytest.raises(EnvironmentExecutionError) as info:
                    await runtime.call("w", tasks.add, 1, 2)
            message = str(info.value)
            assert message.startswith(f"timeout: {url} sent nothing for 0.3s"), message
            assert info.value.payload["kind"] == "Timeout"
