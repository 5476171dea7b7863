"""The websocket executor speaks the one TLS vocabulary (wove.tls), validates through
wove.options and describes failures with one table (FAILURES), against real workers.

The TLS dict is the same as in the http and grpc packages' tests of this name; the
worker's certificate (from a trustme CA) names only ``worker.test``, so the executor
reaches 127.0.0.1 and checks the certificate against ``server_hostname``.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from typing import Any

import pytest

from wove.errors import ConfigError, EnvironmentExecutionError
from wove.runtime import ExecutorRuntime
from wove.testing import WorkerProcess, tasks
from wove_executor_ws import WebSocketEnvironmentExecutor
from wove_executor_ws.executor import FAILURES

pytest.importorskip("trustme")  # the root conftest's pki fixture issues the certificates


def tls_config(pki: dict[str, str]) -> dict[str, Any]:
    """The TLS keys, identical for http, grpc and websocket."""
    return {"tls": True, "ca_file": pki["ca"], "server_hostname": "worker.test"}


@pytest.fixture(scope="module")
def tls_worker(pki: dict[str, str]) -> Iterator[str]:
    worker = WorkerProcess("websocket", "--certfile", pki["cert"], "--keyfile", pki["key"])
    url = worker.start(0)
    yield url
    worker.stop()


@pytest.fixture(scope="module")
def plain_worker() -> Iterator[WorkerProcess]:
    worker = WorkerProcess("websocket", "--max-body-bytes", "65536")
    worker.start(0)
    yield worker
    worker.stop()


def runtime_for(url: str, **config: Any) -> ExecutorRuntime:
    return ExecutorRuntime({"ws": {"executor": "websocket", "executor_config": {"url": url, **config}}}, {})


async def start_error(url: str, **config: Any) -> str:
    executor = WebSocketEnvironmentExecutor()
    with pytest.raises(ConnectionError) as info:
        await executor.start(environment_name="ws", run_config={}, environment_config={"url": url, **config})
    return str(info.value)


# -- the TLS vocabulary --------------------------------------------------------------
async def test_the_shared_tls_keys_reach_a_real_tls_worker(tls_worker: str, pki: dict[str, str]) -> None:
    assert tls_worker.startswith("wss://127.0.0.1:")
    async with runtime_for(tls_worker, **tls_config(pki)) as runtime:
        assert await runtime.call("ws", tasks.add, 20, 22) == 42


async def test_the_older_websocket_spellings_still_work(tls_worker: str, pki: dict[str, str]) -> None:
    context = ssl.create_default_context(cafile=pki["ca"])
    async with runtime_for(tls_worker, ssl=context, server_hostname="worker.test") as runtime:
        assert await runtime.call("ws", tasks.add, 1, 2) == 3
    older = {"ssl": True, "ca_file": pki["ca"], "certfile": pki["client_cert"], "keyfile": pki["client_key"],
             "server_hostname": "worker.test"}
    async with runtime_for(tls_worker, **older) as runtime:
        assert await runtime.call("ws", tasks.add, 2, 2) == 4


# -- the failure table, on real failures ----------------------------------------------
async def test_a_certificate_for_another_name_is_refused(tls_worker: str, pki: dict[str, str]) -> None:
    message = await start_error(tls_worker, ca_file=pki["ca"])  # no server_hostname: 127.0.0.1 is not named
    assert f"TLS certificate verify failed for {tls_worker}" in message, message
    assert "executor_config.server_hostname" in message and "executor_config.ca_file" in message


async def test_an_unknown_ca_is_refused(tls_worker: str) -> None:
    message = await start_error(tls_worker, server_hostname="worker.test")  # the system CAs
    assert f"TLS certificate verify failed for {tls_worker}" in message and "ca_file" in message, message


async def test_wss_to_a_plaintext_worker(plain_worker: WorkerProcess) -> None:
    url = plain_worker.address.replace("ws://", "wss://")
    message = await start_error(url)
    assert f"the worker at {url} closed the connection during the TLS handshake" in message, message
    assert "A plaintext worker (started without --certfile) needs a ws:// URL" in message


async def test_ws_to_a_tls_worker(tls_worker: str) -> None:
    url = tls_worker.replace("wss://", "ws://")
    message = await start_error(url)
    assert f"{url} did not answer the WebSocket handshake" in message and "use a wss:// URL" in message, message


async def test_a_closed_port_is_connection_refused() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: refused
        url = f"ws://127.0.0.1:{port}/wove"
        message = await start_error(url)
    assert f"connection refused at {url}" in message and f"wove worker websocket --port {port}" in message, message


@pytest.mark.parametrize(("security", "status", "hint"), [
    (None, 401, "Configure executor_config.security to match the worker's --security"),
    ({"type": "signed", "secret": "not-the-secret"}, 403, "uses the worker's secret and that the clocks agree"),
])
async def test_rejected_handshakes(worker_factory: Any, security: Any, status: int, hint: str) -> None:
    worker = worker_factory("--security", "env:WOVE_WS_VOCAB_SECRET", env={"WOVE_WS_VOCAB_SECRET": "s3cret"})
    worker.start(0)
    message = await start_error(worker.url, security=security)
    assert f"the server rejected the WebSocket handshake with HTTP {status}" in message and hint in message, message


async def test_a_message_too_big_closes_with_1009_and_says_so(plain_worker: WorkerProcess) -> None:
    async with runtime_for(plain_worker.address, reconnect_initial_delay=0.05) as runtime:
        with pytest.raises(EnvironmentExecutionError) as info:
            await runtime.call("ws", tasks.echo, "x" * 200_000)
        assert info.value.payload["kind"] == "MessageTooBig", info.value.payload
        assert "closed with code 1009" in str(info.value) and "--max-body-bytes" in str(info.value)
        assert await runtime.call("ws", tasks.add, 1, 1) == 2  # reconnected


def test_the_table_is_one_shape() -> None:
    kinds = [rule.kind for rule in FAILURES]
    assert len(kinds) == len(set(kinds))
    assert all(rule.label and rule.hint and (rule.types or rule.status or rule.close_code) for rule in FAILURES)


# -- executor_config validation ---------------------------------------------------------
@pytest.mark.parametrize(("config", "message"), [
    ({"ping_intervall": 5}, r"^Environment 'ws': executor_config key 'ping_intervall' \(did you mean "
                            r"'ping_interval'\?\) is not a websocket executor option\. Known keys: binary_frames, ca_file, "),
    ({"max_workers": 2}, r"key 'max_workers' is not a websocket executor option"),
    ({"cafile": "x"}, r"'cafile' \(did you mean 'ca_file'\?\)"),
    ({"tls": True}, r"tls is True but the URL scheme says TLS is off"),
    ({"max_size": 0}, r"executor_config\.max_size must be a positive integer \(bytes\) or false, got 0"),
])
async def test_bad_keys_fail_at_start(config: dict[str, Any], message: str) -> None:
    executor = WebSocketEnvironmentExecutor()
    with pytest.raises(ConfigError, match=message):
        await executor.start(environment_name="ws", run_config={},
                             environment_config={"url": "ws://127.0.0.1:1/wove", **config})
