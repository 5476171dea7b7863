"""The grpc executor against real grpc.aio servers on 127.0.0.1 (in process and subprocesses)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import trustme

from wove.errors import EnvironmentExecutionError
from wove.protocol import decode_events, encode_frame
from wove.runtime import ExecutorRuntime
from wove.testing import tasks
from wove.worker import WorkerEngine
from wove_executor_grpc import GrpcEnvironmentExecutor
from wove_executor_grpc.server import (
    SEND_METHOD,
    SESSION_METHOD,
    STREAM_METHOD,
    GrpcWorkerServer,
    GrpcWorkerService,
    start_server,
)

pytestmark = pytest.mark.integration

SECRET = "grpc-test-secret"


def run_frame(func: Any, args: dict[str, Any], **delivery: Any) -> dict[str, Any]:
    name = getattr(func, "__name__", "task")
    return {
        "type": "run_task", "run_id": f"{name}:{time.monotonic_ns():x}", "task_id": name,
        "callable": func, "args": args,
        "delivery": {"delivery_cancel_mode": "best_effort", "delivery_orphan_policy": "cancel", **delivery},
    }


def sign(body: bytes, *, method: str = SEND_METHOD, secret: str = SECRET, timestamp: int | None = None,
         nonce: str = "n0nce", key: str = "default") -> tuple[tuple[str, str], ...]:
    """Signed metadata computed from the documented scheme (independently of wove.security)."""
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    canonical = "\n".join(["wove-v1", "grpc", method, stamp, nonce, hashlib.sha256(body).hexdigest()])
    signature = "v1=" + hmac.new(secret.encode(), canonical.encode(), hashlib.sha256).hexdigest()
    return (("x-wove-key", key), ("x-wove-timestamp", stamp), ("x-wove-nonce", nonce), ("x-wove-signature", signature))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def server() -> AsyncIterator[GrpcWorkerServer]:
    running = await start_server()
    yield running
    await running.stop(1.0)


@pytest.fixture
async def signed_server() -> AsyncIterator[GrpcWorkerServer]:
    running = await start_server(security={"type": "signed", "secret": SECRET})
    yield running
    await running.stop(1.0)


def runtime_for(config: dict[str, Any], **run_config: Any) -> ExecutorRuntime:
    return ExecutorRuntime({"workers": {"executor": "grpc", "executor_config": config}}, run_config)


async def raw_send(target: str, body: bytes, metadata: Any = None, method: str = SEND_METHOD) -> bytes:
    async with grpc.aio.insecure_channel(target) as channel:
        return await channel.unary_unary(method)(body, metadata=metadata, timeout=10)


# -- security -------------------------------------------------------------------------
@pytest.mark.parametrize("streaming", ["auto", False, True])
async def test_signed_metadata_is_accepted(signed_server: GrpcWorkerServer, streaming: Any) -> None:
    # auto: the Session call is signed once; False/True: every Send/Stream call (own method path)
    config = {"target": signed_server.target, "security": {"type": "signed", "secret": SECRET},
              "streaming": streaming}
    async with runtime_for(config) as runtime:
        assert await runtime.call("workers", tasks.add, 2, 3) == 5
        assert await runtime.call_with("workers", tasks.sleep, (0.2,), delivery_heartbeat_seconds=0.5) == "slept"


async def test_signed_from_env_variable(signed_server: GrpcWorkerServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WOVE_GRPC_TEST_SECRET", SECRET)
    async with runtime_for({"target": signed_server.target, "security": "env:WOVE_GRPC_TEST_SECRET"}) as runtime:
        assert await runtime.call("workers", tasks.add, 1, 1) == 2


async def test_unsigned_request_is_unauthenticated(signed_server: GrpcWorkerServer, marker: Path) -> None:
    async with runtime_for({"target": signed_server.target}) as runtime:
        with pytest.raises(EnvironmentExecutionError) as info:
            await runtime.call("workers", tasks.write_marker, str(marker))
    message = str(info.value)
    assert "UNAUTHENTICATED" in message and signed_server.target in message
    assert info.value.payload["source"] == "transport"
    assert not marker.exists()


async def test_wrong_secret_is_permission_denied(signed_server: GrpcWorkerServer, marker: Path) -> None:
    config = {"target": signed_server.target, "security": {"type": "signed", "secret": "not-the-secret"}}
    async with runtime_for(config) as runtime:
        with pytest.raises(EnvironmentExecutionError, match="PERMISSION_DENIED"):
            await runtime.call("workers", tasks.write_marker, str(marker))
    assert not marker.exists()


async def test_tampered_replayed_and_expired_requests_are_rejected(
    signed_server: GrpcWorkerServer, tmp_path: Path
) -> None:
    target = signed_server.target
    first, second = tmp_path / "first", tmp_path / "second"
    body = encode_frame(run_frame(tasks.write_marker, {"path": str(first)}))
    other = encode_frame(run_frame(tasks.write_marker, {"path": str(second)}))

    # tampered: signature over `body`, request carries `other`
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await raw_send(target, other, sign(body, nonce="tampered"))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert not second.exists()

    # expired: a correct signature made 1000 s ago
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await raw_send(target, other, sign(other, timestamp=int(time.time()) - 1000, nonce="old"))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "Expired" in (info.value.details() or "")
    assert not second.exists()

    # accepted once, then replayed
    metadata = sign(body, nonce="once")
    events = decode_events(await raw_send(target, body, metadata))
    assert events[-1]["type"] == "task_result" and first.exists()
    first.unlink()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await raw_send(target, body, metadata)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "Replayed" in (info.value.details() or "")
    assert not first.exists()

    # signed for Send, sent to Stream: the method path is part of the signature
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async with grpc.aio.insecure_channel(target) as channel:
            async for _ in channel.unary_stream(STREAM_METHOD)(other, metadata=sign(other, nonce="m"), timeout=10):
                pass
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert not second.exists()


async def test_malformed_frames_are_invalid_argument(server: GrpcWorkerServer) -> None:
    for body in (b"not json", b"[1,2]", b'{"type":"launch"}',
                 b'{"type":"run_task","run_id":"x:1","task_id":"x","callable_pickle":"@@@"}'):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await raw_send(server.target, body)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, body
    assert server.service.engine.active == 0


async def test_session_answers_malformed_commands_on_the_session(server: GrpcWorkerServer) -> None:
    good = encode_frame(run_frame(tasks.add, {"a": 1, "b": 2}))
    bad = b'{"type":"run_task","run_id":"bad:1","task_id":"bad","callable_pickle":"@@@"}'
    events: list[dict[str, Any]] = []
    async with grpc.aio.insecure_channel(server.target) as channel:
        call = channel.stream_stream(SESSION_METHOD)(timeout=10)
        await call.write(b"[" + good + b"," + bad + b"]")
        await call.write(b"not json")
        await call.done_writing()
        async for message in call:
            events.extend(decode_events(message))
    terminal = {e["run_id"].split(":")[0]: e for e in events if e["type"] in ("task_result", "task_error")}
    assert terminal["add"]["result"] == 3
    assert terminal["bad"]["type"] == "task_error" and "callable_pickle" in terminal["bad"]["error"]["message"]
    assert any(e["type"] == "log" and "malformed" in e["message"] for e in events)


# -- streaming, cancellation ----------------------------------------------------------
async def test_stream_delivers_heartbeats_as_they_happen(server: GrpcWorkerServer) -> None:
    executor = GrpcEnvironmentExecutor()
    await executor.start(environment_name="hb", environment_config={"target": server.target}, run_config={})
    try:
        frame = run_frame(tasks.sleep, {"seconds": 1.0}, delivery_heartbeat_seconds=0.3)
        await executor.send(frame)
        started = time.monotonic()
        seen: list[tuple[str, float]] = []
        while not seen or seen[-1][0] != "task_result":
            event = await asyncio.wait_for(executor.recv(), 10)
            seen.append((event["type"], time.monotonic() - started))
        kinds = [kind for kind, _ in seen]
        assert kinds[0] == "task_started" and kinds.count("heartbeat") >= 3
        first_beat = next(at for kind, at in seen if kind == "heartbeat")
        assert first_beat < seen[-1][1], "heartbeats arrive before the result, not with it"
    finally:
        await executor.stop()


async def test_heartbeats_keep_a_long_task_alive(server: GrpcWorkerServer) -> None:
    async with runtime_for({"target": server.target}) as runtime:
        assert await runtime.call_with("workers", tasks.sleep, (2.0,), delivery_heartbeat_seconds=0.5) == "slept"


@pytest.mark.parametrize("streaming", ["auto", False, True])
async def test_cancellation_reaches_the_worker(server: GrpcWorkerServer, marker: Path, streaming: bool) -> None:
    async with runtime_for({"target": server.target, "streaming": streaming}) as runtime:
        call = asyncio.ensure_future(runtime.call("workers", tasks.sleep, 1.5, str(marker)))
        await asyncio.sleep(0.3)
        assert server.service.engine.active == 1
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        for _ in range(50):
            if server.service.engine.active == 0:
                break
            await asyncio.sleep(0.02)
        assert server.service.engine.active == 0, "the worker still runs a cancelled task"
        await asyncio.sleep(1.5)
        assert not marker.exists()
        assert await runtime.call("workers", tasks.add, 1, 2) == 3


async def test_stream_falls_back_to_send_on_unimplemented() -> None:
    # a Wove 2.x-style server: Send only (no Session, no Stream)
    service = GrpcWorkerService(WorkerEngine(name="v2-like"), stream_method="/other.Service/Nothing",
                                session_method=None)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(service.handlers())
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        environment = {"workers": {"executor": GrpcEnvironmentExecutor(),
                                   "executor_config": {"target": f"127.0.0.1:{port}"}}}
        async with ExecutorRuntime(environment, {}) as runtime:
            result = await runtime.call_with("workers", tasks.add, (2, 2), delivery_heartbeat_seconds=5)
            assert result == 4
            assert environment["workers"]["executor"]._streaming is False
            assert await runtime.call_with("workers", tasks.add, (3, 3), delivery_heartbeat_seconds=5) == 6
    finally:
        await service.close(1.0)
        await server.stop(None)


# -- volume and size ------------------------------------------------------------------
async def test_2000_tasks_with_256_in_flight(grpc_worker: Any) -> None:
    async with runtime_for({"target": grpc_worker.target}, delivery_max_in_flight=256) as runtime:
        results = await asyncio.wait_for(
            asyncio.gather(*(runtime.call("workers", tasks.add, i, 1) for i in range(2000))), 50
        )
    assert results == [i + 1 for i in range(2000)]


async def test_large_payload_round_trip(grpc_worker: Any) -> None:
    payload = b"\x01" * (21 * 1024 * 1024)
    async with runtime_for({"target": grpc_worker.target}) as runtime:
        assert await runtime.call("workers", tasks.echo, payload) == payload


# -- TLS ------------------------------------------------------------------------------
async def test_tls_and_mtls_with_trustme(tmp_path: Path) -> None:
    ca = trustme.CA()
    server_cert = ca.issue_cert("localhost", "127.0.0.1")
    certfile, keyfile = tmp_path / "server.pem", tmp_path / "server.key"
    server_cert.cert_chain_pems[0].write_to_path(str(certfile))
    server_cert.private_key_pem.write_to_path(str(keyfile))
    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))

    running = await start_server(certfile=str(certfile), keyfile=str(keyfile))
    try:
        # root certificates as a file path; plaintext against TLS fails as a transport error
        async with runtime_for({"target": f"localhost:{running.port}", "secure": True,
                                "root_certificates": str(ca_path)}) as runtime:
            assert await runtime.call("workers", tasks.add, 20, 22) == 42
        async with runtime_for({"target": running.target}) as runtime:
            with pytest.raises(EnvironmentExecutionError, match="UNAVAILABLE"):
                await runtime.call("workers", tasks.add, 1, 1)
    finally:
        await running.stop(1.0)

    client_cert = ca.issue_cert("client@example.org")
    running = await start_server(certfile=server_cert.cert_chain_pems[0].bytes(),
                                 keyfile=server_cert.private_key_pem.bytes(), client_ca=ca.cert_pem.bytes())
    try:
        mtls = {"target": f"localhost:{running.port}", "root_certificates": ca.cert_pem.bytes().decode(),
                "certificate_chain": client_cert.cert_chain_pems[0].bytes(),
                "private_key": client_cert.private_key_pem.bytes()}
        async with runtime_for(mtls) as runtime:
            assert await runtime.call_with("workers", tasks.add, (1, 2), delivery_heartbeat_seconds=5) == 3
        without_cert = {"target": f"localhost:{running.port}", "root_certificates": ca.cert_pem.bytes()}
        async with runtime_for(without_cert) as runtime:
            with pytest.raises(EnvironmentExecutionError, match="UNAVAILABLE"):
                await runtime.call("workers", tasks.add, 1, 1)
    finally:
        await running.stop(1.0)


# -- failures -------------------------------------------------------------------------
async def test_unavailable_names_the_target() -> None:
    target = f"127.0.0.1:{free_port()}"
    async with runtime_for({"target": target}) as runtime:
        with pytest.raises(EnvironmentExecutionError) as info:
            await asyncio.wait_for(runtime.call("workers", tasks.add, 1, 1), 20)
        assert info.value.payload["source"] == "transport"
        assert target in str(info.value) and "UNAVAILABLE" in str(info.value)


async def test_unavailable_requeue_gives_up_after_max_deliveries() -> None:
    target = f"127.0.0.1:{free_port()}"
    async with runtime_for({"target": target, "max_deliveries": 2, "ready_timeout": 0.3}) as runtime:
        with pytest.raises(EnvironmentExecutionError, match="Gave up after 2 deliveries"):
            await asyncio.wait_for(
                runtime.call_with("workers", tasks.add, (1, 1), delivery_orphan_policy="requeue"), 20
            )


async def test_deadline_exceeded_is_a_transport_error(server: GrpcWorkerServer) -> None:
    async with runtime_for({"target": server.target, "timeout": 0.3}) as runtime:
        with pytest.raises(EnvironmentExecutionError) as info:
            await runtime.call("workers", tasks.sleep, 2.0)
        assert "DEADLINE_EXCEEDED" in str(info.value) and server.target in str(info.value)
        assert await runtime.call("workers", tasks.add, 1, 1) == 2


async def test_malformed_response_is_a_transport_error() -> None:
    async def garbage(request: bytes, context: Any) -> bytes:
        return b'{"surprise": true}' if b"add" in request else b"<html>"

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "wove.network_executor.WorkerService", {"Send": grpc.unary_unary_rpc_method_handler(garbage)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with runtime_for({"target": f"127.0.0.1:{port}"}) as runtime:
            for func, args in ((tasks.add, (1, 2)), (tasks.echo, (1,))):
                with pytest.raises(EnvironmentExecutionError, match="malformed response") as info:
                    await runtime.call("workers", func, *args)
                assert f"127.0.0.1:{port}" in str(info.value)
    finally:
        await server.stop(None)


async def test_server_killed_mid_call(worker_factory: Any) -> None:
    worker = worker_factory()
    async with runtime_for({"target": worker.target}) as runtime:
        call = asyncio.ensure_future(runtime.call("workers", tasks.sleep, 5.0))
        await asyncio.sleep(0.5)
        worker.kill()
        with pytest.raises(EnvironmentExecutionError) as info:
            await asyncio.wait_for(call, 20)
        assert worker.target in str(info.value) and "UNAVAILABLE" in str(info.value)


async def test_server_killed_mid_call_requeues_to_a_restarted_server(worker_factory: Any, tmp_path: Path) -> None:
    worker = worker_factory()
    async with runtime_for({"target": worker.target, "ready_timeout": 20}) as runtime:
        call = asyncio.ensure_future(runtime.call_with(
            "workers", tasks.sleep, (1.0,), delivery_orphan_policy="requeue"))
        await asyncio.sleep(0.5)
        worker.kill()
        await asyncio.sleep(0.3)
        worker_factory(port=worker.port)
        assert await asyncio.wait_for(call, 30) == "slept"
        assert await runtime.call("workers", tasks.add, 2, 2) == 4


async def test_graceful_stop_requeues_requeue_runs(tmp_path: Path) -> None:
    first = await start_server()
    port = first.port
    async with runtime_for({"target": first.target, "ready_timeout": 10}) as runtime:
        call = asyncio.ensure_future(runtime.call_with(
            "workers", tasks.sleep, (0.5,), delivery_orphan_policy="requeue"))
        await asyncio.sleep(0.2)
        await first.stop(0.5)
        second = await start_server(port=port)
        try:
            assert await asyncio.wait_for(call, 20) == "slept"
        finally:
            await second.stop(1.0)


def test_shutdown_is_not_obeyed_by_default() -> None:
    service = GrpcWorkerService()
    assert service.allow_remote_shutdown is False


async def test_events_reply_is_wove2_shaped(server: GrpcWorkerServer) -> None:
    reply = json.loads(await raw_send(server.target, encode_frame(run_frame(tasks.add, {"a": 1, "b": 2}))))
    assert [event["type"] for event in reply["events"]] == ["task_started", "task_result"]
    assert "result_pickle" in reply["events"][-1]
    cancel = {"type": "cancel_task", "run_id": "nothing:1", "task_id": "nothing"}
    assert json.loads(await raw_send(server.target, json.dumps(cancel).encode())) == {"events": []}
