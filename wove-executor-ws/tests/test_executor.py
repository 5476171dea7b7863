"""The websocket executor against real ``wove worker websocket`` subprocesses."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from wove.errors import DeliveryTimeoutError, EnvironmentExecutionError
from wove.runtime import ExecutorRuntime
from wove.security import NetworkExecutorSecurity
from wove.testing import collect_events, tasks
from wove_executor_ws import WebSocketEnvironmentExecutor

FAST_RECONNECT = {"reconnect_initial_delay": 0.05, "reconnect_max_delay": 0.3}


def counting_task(counter: Path, seconds: float) -> Callable[[], str]:
    """A task (pickled by value) that sleeps, then appends one 'x' to ``counter``."""
    path = str(counter)

    def counted() -> str:
        time.sleep(seconds)
        with open(path, "a") as fh:
            fh.write("x")
        return "counted"

    return counted


def runtime_for(url: str, **config: Any) -> ExecutorRuntime:
    return ExecutorRuntime({"ws": {"executor": "websocket", "executor_config": {"url": url, **config}}}, {})


async def started_executor(url: str, **config: Any) -> WebSocketEnvironmentExecutor:
    executor = WebSocketEnvironmentExecutor()
    await executor.start(environment_name="ws", environment_config={"url": url, **config}, run_config={})
    return executor


def run_frame(func: Any, args: dict[str, Any], **delivery: Any) -> dict[str, Any]:
    return {
        "type": "run_task", "run_id": f"t:{uuid.uuid4().hex}", "task_id": "t", "callable": func, "args": args,
        "delivery": {"delivery_orphan_policy": "cancel", **delivery},
    }


# -- security ------------------------------------------------------------------
async def test_signed_handshake_is_accepted(signed_worker: Any, secret_env: str) -> None:
    async with runtime_for(signed_worker.url, security=secret_env) as runtime:
        assert await runtime.call("ws", tasks.add, 20, 22) == 42


@pytest.mark.parametrize(
    ("security", "status"),
    [(None, "401"), ({"type": "signed", "secret": "not-the-secret"}, "403")],
    ids=["missing", "wrong-secret"],
)
async def test_bad_credentials_are_rejected_before_anything_runs(
    signed_worker: Any, security: Any, status: str, tmp_path: Path
) -> None:
    executor = WebSocketEnvironmentExecutor()
    with pytest.raises(ConnectionError) as info:
        await executor.start(environment_name="ws", environment_config={"url": signed_worker.url, "security": security},
                             run_config={})
    assert signed_worker.url in str(info.value) and f"HTTP {status}" in str(info.value)
    with pytest.raises(ConnectionError):
        async with runtime_for(signed_worker.url, security=security) as runtime:
            await runtime.call("ws", tasks.write_marker, str(tmp_path / "marker"))
    assert not (tmp_path / "marker").exists()


async def test_replayed_handshake_is_rejected(signed_worker: Any, secret_env: str) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    security = NetworkExecutorSecurity.from_config(secret_env).resolve()
    headers = security.headers_for(transport="websocket", target="/wove", body=b"")
    async with connect(signed_worker.url, additional_headers=headers, proxy=None) as ws:
        await ws.ping()
    with pytest.raises(InvalidStatus) as info:
        async with connect(signed_worker.url, additional_headers=headers, proxy=None):
            pass
    assert info.value.response.status_code == 403
    assert b"Replayed" in info.value.response.body


async def test_wrong_path_is_404(shared_worker_url: str) -> None:
    with pytest.raises(ConnectionError, match="HTTP 404"):
        await started_executor(shared_worker_url.replace("/wove", "/nope"))


@pytest.fixture
def shared_worker_url(shared_worker: Any) -> str:
    return str(shared_worker.url)


async def test_config_errors_name_the_key(shared_worker_url: str) -> None:
    with pytest.raises(ValueError, match="ws:// or wss://"):
        await started_executor("http://127.0.0.1:1/wove")
    with pytest.raises(ValueError, match="executor_config key 'target' is not a websocket executor option"):
        await started_executor(shared_worker_url, target="x")
    with pytest.raises(ValueError, match="without TLS"):
        await started_executor("ws://example.com/wove")


async def test_start_fails_clearly_without_a_server() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"ws://127.0.0.1:{port}/wove"
    with pytest.raises(ConnectionError, match=f"could not connect to {url}"):
        await asyncio.wait_for(started_executor(url), 10)


# -- runs ------------------------------------------------------------------------
async def test_heartbeats_arrive(shared_worker_url: str) -> None:
    executor = await started_executor(shared_worker_url)
    try:
        frame = run_frame(tasks.blocking_sleep, {"seconds": 1.0}, delivery_heartbeat_seconds=0.3)
        await executor.send(frame)
        events = await collect_events(executor, {frame["run_id"]}, timeout=10, linger=0.05)
        assert sum(e["type"] == "heartbeat" for e in events) >= 3
        assert events[-1]["type"] == "task_result" and events[-1]["result"] == 1.0
    finally:
        await executor.stop()


async def test_delivery_timeout_cancels_on_the_worker(shared_worker_url: str, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    async with runtime_for(shared_worker_url) as runtime:
        with pytest.raises(DeliveryTimeoutError):
            await runtime.call_with("ws", tasks.sleep, (1.5, str(marker)), delivery_timeout=0.3)
        await asyncio.sleep(1.6)
    assert not marker.exists()


async def test_closing_the_connection_cancels_cancel_policy_runs(shared_worker_url: str, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    executor = await started_executor(shared_worker_url)
    await executor.send(run_frame(tasks.sleep, {"seconds": 1.0, "marker": str(marker)}))
    await asyncio.sleep(0.3)
    await executor.stop()
    await asyncio.sleep(1.2)
    assert not marker.exists()


async def test_large_argument_and_result(shared_worker_url: str) -> None:
    blob = bytes(range(256)) * (20 * 1024 * 1024 // 256 + 1)
    async with runtime_for(shared_worker_url) as runtime:
        result = await asyncio.wait_for(runtime.call("ws", tasks.echo, blob), 30)
    assert result == blob


async def test_many_tasks_with_256_in_flight(shared_worker_url: str) -> None:
    limit = asyncio.Semaphore(256)

    async def one(i: int) -> int:
        async with limit:
            return int(await runtime.call("ws", tasks.add, i, 1))

    async with runtime_for(shared_worker_url) as runtime:
        results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(2000))), 40)
    assert results == [i + 1 for i in range(2000)]


# -- connection loss -------------------------------------------------------------
async def test_server_restart_mid_run_requeue_runs_exactly_once(worker_factory: Any, tmp_path: Path) -> None:
    worker = worker_factory()
    worker.start(0)
    counter = tmp_path / "counter"
    async with runtime_for(worker.url, reconnect_timeout=15, **FAST_RECONNECT) as runtime:
        call = asyncio.ensure_future(
            runtime.call_with("ws", counting_task(counter, 1.0), (), delivery_orphan_policy="requeue")
        )
        await asyncio.sleep(0.4)
        worker.kill()
        await asyncio.to_thread(worker.start)  # the same port
        assert await asyncio.wait_for(call, 20) == "counted"
        assert await runtime.call("ws", tasks.add, 1, 1) == 2  # the connection is healthy again
    assert counter.read_text() == "x"


class _CuttableProxy:
    """A TCP forwarder to the worker whose open connections the test can cut (abort, not close)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port, self.path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path
        self._links: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self._server: asyncio.Server | None = None
        #: connections accepted so far
        self.connections = 0

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._forward, "127.0.0.1", 0)
        return f"ws://127.0.0.1:{self._server.sockets[0].getsockname()[1]}{self.path}"

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        self._links.append((writer, up_writer))

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except OSError:
                pass
            finally:
                sink.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        for client, upstream in self._links:
            client.transport.abort()
            upstream.transport.abort()
        self._links.clear()

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()


async def test_network_cut_requeue_attaches_to_the_running_execution(shared_worker_url: str, tmp_path: Path) -> None:
    counter = tmp_path / "counter"
    proxy = _CuttableProxy(shared_worker_url)
    url = await proxy.start()
    try:
        async with runtime_for(url, **FAST_RECONNECT) as runtime:
            call = asyncio.ensure_future(
                runtime.call_with("ws", counting_task(counter, 1.0), (), delivery_orphan_policy="requeue")
            )
            await asyncio.sleep(0.4)
            proxy.cut()  # the connection breaks in the middle of the run; the proxy still accepts
            assert await asyncio.wait_for(call, 20) == "counted"
            assert proxy.connections >= 2, "the executor never reconnected: the cut did not happen"
    finally:
        await proxy.stop()
    await asyncio.sleep(0.3)
    assert counter.read_text() == "x"


async def test_server_killed_without_requeue_fails_naming_the_url(worker_factory: Any, tmp_path: Path) -> None:
    worker = worker_factory()
    worker.start(0)
    async with runtime_for(worker.url, **FAST_RECONNECT) as runtime:
        call = asyncio.ensure_future(runtime.call("ws", counting_task(tmp_path / "c", 2.0)))
        await asyncio.sleep(0.4)
        worker.kill()
        with pytest.raises(EnvironmentExecutionError) as info:
            await asyncio.wait_for(call, 10)
    message = str(info.value)
    assert worker.url in message and "was lost" in message
    assert info.value.payload["source"] == "transport"


async def test_server_gone_for_good_fails_clearly_without_hanging(worker_factory: Any, tmp_path: Path) -> None:
    worker = worker_factory()
    worker.start(0)
    async with runtime_for(worker.url, reconnect_timeout=1.0, **FAST_RECONNECT) as runtime:
        in_flight = asyncio.ensure_future(
            runtime.call_with("ws", counting_task(tmp_path / "c", 2.0), (), delivery_orphan_policy="requeue")
        )
        await asyncio.sleep(0.3)
        worker.kill()
        await asyncio.sleep(0.2)
        with pytest.raises(EnvironmentExecutionError) as late:  # within reconnect_timeout, not a hang
            await asyncio.wait_for(runtime.call("ws", tasks.add, 1, 2), 10)
        with pytest.raises(EnvironmentExecutionError) as lost:
            await asyncio.wait_for(in_flight, 10)
    for info in (late, lost):
        assert worker.url in str(info.value) and "reconnect_timeout=1s" in str(info.value)
        assert info.value.payload["source"] == "transport"


async def test_runs_sent_while_disconnected_wait_for_the_connection(worker_factory: Any) -> None:
    worker = worker_factory()
    worker.start(0)
    async with runtime_for(worker.url, reconnect_timeout=15, **FAST_RECONNECT) as runtime:
        assert await runtime.call("ws", tasks.add, 1, 1) == 2
        worker.kill()
        await asyncio.sleep(0.3)
        call = asyncio.ensure_future(runtime.call("ws", tasks.add, 2, 2))
        await asyncio.sleep(0.3)
        assert not call.done()
        await asyncio.to_thread(worker.start)
        assert await asyncio.wait_for(call, 15) == 4
