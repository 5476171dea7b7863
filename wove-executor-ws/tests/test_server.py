"""The worker service in process: limits, TLS, graceful shutdown."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import pytest

from wove.errors import EnvironmentExecutionError
from wove.runtime import ExecutorRuntime
from wove.testing import collect_events, tasks
from wove_executor_ws import WebSocketEnvironmentExecutor
from wove_executor_ws.server import WebSocketWorkerServer


def runtime_for(url: str, **config: Any) -> ExecutorRuntime:
    return ExecutorRuntime({"ws": {"executor": "websocket", "executor_config": {"url": url, **config}}}, {})


async def test_oversized_command_closes_the_connection_and_fails_naming_the_url() -> None:
    async with WebSocketWorkerServer(port=0, max_size=64 * 1024) as server, runtime_for(server.url) as runtime:
        with pytest.raises(EnvironmentExecutionError) as info:
            await asyncio.wait_for(runtime.call("ws", tasks.echo, b"x" * 200_000), 10)
        assert server.url in str(info.value) and "1009" in str(info.value)
        assert await asyncio.wait_for(runtime.call("ws", tasks.add, 1, 2), 10) == 3  # reconnected


async def test_runs_per_connection_are_capped() -> None:
    async with WebSocketWorkerServer(port=0, max_runs_per_connection=2) as server:
        executor = WebSocketEnvironmentExecutor()
        await executor.start(environment_name="ws", environment_config={"url": server.url}, run_config={})
        try:
            frames = [{"type": "run_task", "run_id": f"s:{i}", "task_id": "s", "callable": tasks.sleep,
                       "args": {"seconds": 0.3}, "delivery": {}} for i in range(3)]
            for frame in frames:
                await executor.send(frame)
            events = await collect_events(executor, {f["run_id"] for f in frames}, timeout=10, linger=0.05)
            terminal = {e["run_id"]: e for e in events if e["type"] in ("task_result", "task_error")}
            assert terminal["s:2"]["type"] == "task_error"
            assert "max_runs_per_session=2" in terminal["s:2"]["error"]["message"]
            assert terminal["s:0"]["result"] == terminal["s:1"]["result"] == "slept"
        finally:
            await executor.stop()


async def test_wss_with_a_private_ca(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(server_context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    async with WebSocketWorkerServer(port=0, ssl=server_context) as server:
        assert server.url.startswith("wss://")
        async with runtime_for(server.url, ca_file=str(ca_file)) as runtime:
            assert await runtime.call("ws", tasks.add, 2, 3) == 5
        with pytest.raises(ConnectionError, match=r"CERTIFICATE_VERIFY_FAILED|certificate"):
            async with runtime_for(server.url) as runtime:
                pass


async def test_graceful_stop_cancels_and_closes() -> None:
    server = WebSocketWorkerServer(port=0)
    await server.start()
    async with runtime_for(server.url, reconnect_timeout=0.5, reconnect_initial_delay=0.05) as runtime:
        call = asyncio.ensure_future(runtime.call("ws", tasks.sleep, 5.0))
        await asyncio.sleep(0.3)
        await asyncio.wait_for(server.stop(grace=1.0), 10)
        with pytest.raises(asyncio.CancelledError):  # orphan policy cancel -> task_cancelled
            await asyncio.wait_for(call, 10)


async def test_shutdown_frame_ends_only_that_session() -> None:
    async with WebSocketWorkerServer(port=0) as server:
        async with runtime_for(server.url) as first, runtime_for(server.url) as second:
            assert await first.call("ws", tasks.add, 1, 1) == 2
            await first.stop()  # sends shutdown on its own connection
            assert await asyncio.wait_for(second.call("ws", tasks.add, 2, 2), 10) == 4
        assert not server.engine.closing


async def test_cli_serves_wss_with_certfile_and_keyfile(worker_factory: Any, tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    worker = worker_factory("--certfile", str(tmp_path / "cert.pem"), "--keyfile", str(tmp_path / "key.pem"))
    url = await asyncio.to_thread(worker.start, 0)
    assert url.startswith("wss://127.0.0.1:")
    async with runtime_for(url, ca_file=str(tmp_path / "ca.pem")) as runtime:
        assert await runtime.call("ws", tasks.add, 3, 4) == 7
