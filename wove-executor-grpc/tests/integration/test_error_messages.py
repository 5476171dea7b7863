"""What a user reads when a gRPC call fails: TLS mismatches, certificates, credentials.

Real servers on 127.0.0.1 (certificates from trustme); each message must name what went
wrong and the executor_config keys that fix it, once, without doubled periods.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trustme

from wove.environment import ExecutorRuntime
from wove.errors import EnvironmentExecutionError
from wove_executor_grpc.server import GrpcWorkerServer, start_server

pytestmark = pytest.mark.integration

NOT_RUNNING = "Is the worker service running"


async def failure(config: dict[str, Any], **delivery: Any) -> str:
    async with ExecutorRuntime({"w": {"executor": "grpc", "executor_config": config}}, {}) as runtime:
        with pytest.raises(EnvironmentExecutionError) as info:
            await asyncio.wait_for(runtime.call_with("w", max, (1, 2), **delivery), 20)
    assert info.value.payload["source"] == "transport"
    return str(info.value)


def assert_well_formed(message: str) -> None:
    assert ".." not in message and ". ." not in message and "?." not in message, message


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def tls_server(ca: trustme.CA) -> AsyncIterator[GrpcWorkerServer]:
    cert = ca.issue_cert("127.0.0.1")
    running = await start_server(certfile=cert.cert_chain_pems[0].bytes(), keyfile=cert.private_key_pem.bytes())
    yield running
    await running.stop(0.5)


STREAMING = ["auto", False, True]  # Session, Send, Stream


@pytest.mark.parametrize("streaming", STREAMING)
async def test_plaintext_client_to_a_tls_worker(tls_server: GrpcWorkerServer, streaming: Any) -> None:
    message = await failure({"target": tls_server.target, "streaming": streaming})
    assert "TLS worker" in message and "plaintext client" in message, message
    assert "executor_config.tls" in message and "ca_file" in message
    assert NOT_RUNNING not in message
    assert_well_formed(message)


@pytest.mark.parametrize("streaming", STREAMING)
async def test_certificate_from_an_unknown_ca(tls_server: GrpcWorkerServer, streaming: Any) -> None:
    stranger = trustme.CA()
    message = await failure({"target": tls_server.target, "root_certificates": stranger.cert_pem.bytes(),
                             "streaming": streaming})
    assert "TLS handshake failed: the worker's certificate could not be verified" in message, message
    assert "executor_config.ca_file" in message
    assert NOT_RUNNING not in message
    assert_well_formed(message)


async def test_certificate_for_another_host(ca: trustme.CA) -> None:
    cert = ca.issue_cert("elsewhere.example")
    running = await start_server(certfile=cert.cert_chain_pems[0].bytes(), keyfile=cert.private_key_pem.bytes())
    try:
        message = await failure({"target": running.target, "root_certificates": ca.cert_pem.bytes()})
    finally:
        await running.stop(0.5)
    assert "TLS handshake failed" in message and "does not name the host in executor_config.target" in message
    assert NOT_RUNNING not in message
    assert_well_formed(message)


async def test_tls_client_to_a_plaintext_worker(ca: trustme.CA) -> None:
    running = await start_server()
    try:
        message = await failure({"target": running.target, "root_certificates": ca.cert_pem.bytes()})
    finally:
        await running.stop(0.5)
    assert "TLS handshake failed" in message and "plaintext" in message, message
    assert "executor_config.tls" in message
    assert NOT_RUNNING not in message
    assert_well_formed(message)


async def test_missing_client_certificate_for_mtls(ca: trustme.CA) -> None:
    cert = ca.issue_cert("127.0.0.1")
    running = await start_server(certfile=cert.cert_chain_pems[0].bytes(), keyfile=cert.private_key_pem.bytes(),
                                 client_ca=ca.cert_pem.bytes())
    try:
        message = await failure({"target": running.target, "root_certificates": ca.cert_pem.bytes()})
    finally:
        await running.stop(0.5)
    assert "TLS" in message and "--client-ca" in message, message
    assert "executor_config.cert_file" in message and "key_file" in message
    assert NOT_RUNNING not in message
    assert_well_formed(message)


async def test_nothing_listening_still_asks_whether_the_worker_runs() -> None:
    running = await start_server()
    target = running.target
    await running.stop(0.1)
    message = await failure({"target": target})
    assert "UNAVAILABLE" in message and NOT_RUNNING in message and "TLS" not in message
    assert_well_formed(message)


# -- credentials -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def secret() -> str:
    return "grpc-error-message-secret"


@pytest.fixture
async def signed_server(secret: str) -> AsyncIterator[GrpcWorkerServer]:
    running = await start_server(security={"type": "signed", "secret": secret})
    yield running
    await running.stop(0.5)


@pytest.mark.parametrize("streaming", STREAMING)
async def test_unauthenticated_says_it_once(signed_server: GrpcWorkerServer, streaming: Any) -> None:
    message = await failure({"target": signed_server.target, "streaming": streaming})
    assert "UNAUTHENTICATED" in message
    assert message.count("this worker requires signed requests") == 1, message
    assert message.count("executor_config.security") == 1, message
    assert_well_formed(message)


@pytest.mark.parametrize("streaming", STREAMING)
async def test_wrong_secret_says_it_once(signed_server: GrpcWorkerServer, streaming: Any) -> None:
    config = {"target": signed_server.target, "streaming": streaming,
              "security": {"type": "signed", "secret": "not-the-secret"}}
    message = await failure(config)
    assert "PERMISSION_DENIED" in message
    assert message.count("Invalid signature") == 1, message
    assert message.count("executor_config.security") == 1, message
    assert "secret" in message.split("Invalid signature", 1)[1]
    assert_well_formed(message)


async def test_wrong_bearer_token_names_the_token() -> None:
    running = await start_server(security={"type": "bearer", "token": "right-token"})
    try:
        message = await failure({"target": running.target, "security": {"type": "bearer", "token": "wrong"}})
        missing = await failure({"target": running.target})
    finally:
        await running.stop(0.5)
    assert "PERMISSION_DENIED" in message and message.count("Invalid bearer token") == 1, message
    assert "bearer token" in message.split("Invalid bearer token", 1)[1]
    assert message.count("executor_config.security") == 1
    assert "UNAUTHENTICATED" in missing and missing.count("executor_config.security") == 1, missing
    for text in (message, missing):
        assert_well_formed(text)
