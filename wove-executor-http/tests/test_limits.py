"""Hostile connections: credentials checked before the body, slow bodies, idle connections."""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from typing import Any

import pytest

from wove.environment import ExecutorRuntime
from wove.protocol import encode_frame
from wove.security import NetworkExecutorSecurity, canonical_http_target
from wove.testing import tasks
from wove_executor_http.plugin import serve_in_background
from wove_executor_http.server import create_app

from .conftest import SECRET, Worker

pytestmark = pytest.mark.integration

BIG = 64 * 1024 * 1024


async def _open(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return await asyncio.open_connection(parts.hostname, parts.port)


def _head(url: str, headers: dict[str, str], length: int) -> bytes:
    path = urllib.parse.urlsplit(url).path
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
             f"Content-Length: {length}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _status(reader: asyncio.StreamReader) -> int:
    """The status of the response, read within 10 seconds."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    return int(head.split(b" ", 2)[1])


def _signed_headers(url: str, **changes: str) -> dict[str, str]:
    security = NetworkExecutorSecurity(mode="signed", secret=SECRET)
    headers = security.headers_for(transport="http", target=canonical_http_target(url), body=b"{}")
    headers.update(changes)
    return headers


@pytest.mark.parametrize(("case", "expected"), [
    ("missing", 401),
    ("wrong_key", 403),
    ("expired", 403),
    ("future", 403),
    ("nan_timestamp", 403),
    ("not_a_number", 403),
])
async def test_credentials_are_checked_before_the_body_is_read(signed_worker: Worker, case: str,
                                                               expected: int) -> None:
    """Only the headers of a 64 MiB POST are sent: the answer must come without the body."""
    url = signed_worker.url
    headers = {
        "missing": {},
        "wrong_key": _signed_headers(url, **{"X-Wove-Key": "someone-else"}),
        "expired": _signed_headers(url, **{"X-Wove-Timestamp": str(int(time.time()) - 3600)}),
        "future": _signed_headers(url, **{"X-Wove-Timestamp": str(int(time.time()) + 3600)}),
        "nan_timestamp": _signed_headers(url, **{"X-Wove-Timestamp": "NaN"}),
        "not_a_number": _signed_headers(url, **{"X-Wove-Timestamp": "soon"}),
    }[case]
    reader, writer = await _open(url)
    try:
        writer.write(_head(url, headers, BIG))
        await writer.drain()
        assert await _status(reader) == expected
        body = await asyncio.wait_for(reader.read(), 10)  # the worker closes: it wants no body
        assert (b"Missing" if expected == 401 else b"rejected") in body  # the session's wording
    finally:
        writer.close()


async def test_bearer_token_is_checked_before_the_body_is_read() -> None:
    app = create_app(security={"type": "bearer", "token": "s3cret-token"})
    async with serve_in_background(app) as url:
        for headers, expected in (({}, 401), ({"Authorization": "Bearer wrong"}, 403)):
            reader, writer = await _open(url)
            try:
                writer.write(_head(url, headers, BIG))
                await writer.drain()
                assert await _status(reader) == expected
            finally:
                writer.close()


async def test_a_signed_request_still_runs(signed_worker: Worker, secret_env: str) -> None:
    definition = {"w": {"executor": "http", "executor_config": {"url": signed_worker.url,
                                                                "security": f"env:{secret_env}"}}}
    async with ExecutorRuntime(definition, {}) as runtime:
        assert await runtime.call("w", tasks.add, 2, 3) == 5


@pytest.mark.parametrize("signed", [False, True])
async def test_a_slow_body_times_out_with_408(signed: bool) -> None:
    security = {"type": "signed", "secret": SECRET} if signed else None
    app = create_app(security=security, body_timeout=0.5)
    async with serve_in_background(app) as url:
        body = encode_frame({"type": "run_task", "run_id": "add:slow", "task_id": "add", "callable": tasks.add,
                             "args": {"a": 1, "b": 2}, "delivery": {}})
        headers = {}
        if signed:
            headers = NetworkExecutorSecurity(mode="signed", secret=SECRET).headers_for(
                transport="http", target=canonical_http_target(url), body=body)
        reader, writer = await _open(url)
        try:
            writer.write(_head(url, headers, len(body)) + body[:10])  # then nothing more
            await writer.drain()
            assert await _status(reader) == 408
            answer = await asyncio.wait_for(reader.read(), 10)
            assert b"body_timeout" in answer and b"--body-timeout" in answer
        finally:
            writer.close()


async def test_idle_and_slow_header_connections_are_closed() -> None:
    async with serve_in_background(create_app(header_timeout=0.5)) as url:
        reader, writer = await _open(url)  # sends nothing at all
        try:
            assert await asyncio.wait_for(reader.read(), 10) == b""
        finally:
            writer.close()
        reader, writer = await _open(url)  # headers a few bytes at a time, never finished
        try:
            async def drip() -> None:
                for piece in (b"POST /wove HTTP/1.1\r\n", b"Host: 1", b"27.0.0.1\r\n", *(b"X-A: b\r\n",) * 100):
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.1)

            dripping = asyncio.ensure_future(drip())
            try:
                try:
                    assert await asyncio.wait_for(reader.read(), 10) == b""
                except ConnectionResetError:
                    pass  # closed too: a drip written after the server's close is answered with a reset
            finally:
                dripping.cancel()
                await asyncio.gather(dripping, return_exceptions=True)
        finally:
            writer.close()


async def test_idle_keepalive_connection_is_closed() -> None:
    async with serve_in_background(create_app(keepalive_timeout=0.5)) as url:
        reader, writer = await _open(url)
        try:
            path = urllib.parse.urlsplit(url).path
            writer.write(f"GET {path}/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            await writer.drain()
            assert await _status(reader) == 200
            rest = await asyncio.wait_for(reader.read(), 10)  # the body, then the close
            assert b'"status"' in rest
        finally:
            writer.close()


@pytest.mark.parametrize(("option", "value"), [("body_timeout", 0), ("header_timeout", -1),
                                               ("keepalive_timeout", float("nan")), ("body_timeout", "1")])
def test_timeouts_are_checked(option: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"{option} must be a positive number of seconds"):
        create_app(**{option: value})


def test_cli_flags_reach_the_worker() -> None:
    service = Worker("--body-timeout", "0.5")
    try:
        async def slow() -> int:
            reader, writer = await _open(service.url)
            try:
                writer.write(_head(service.url, {}, 100) + b"{")
                await writer.drain()
                return await _status(reader)
            finally:
                writer.close()

        assert asyncio.run(slow()) == 408
    finally:
        service.stop()
