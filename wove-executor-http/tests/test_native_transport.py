"""The executor's HTTP/1.1 transports at their edges, through the public executor API.

``transport="native"`` (the default: the executor's own keep-alive pool) is the point;
cases that apply as well to ``"aiohttp"`` and ``"httpx"`` run against them too. Every
case talks to a :class:`Front` on 127.0.0.1: a small asyncio HTTP/1.1 server that reads
each request, has a real ``wove worker http`` answer it, and sends that answer back as
the test says (as is; chunked; until close; cut short; with an oversized head; not at
all) while counting the connections it sees.

Covered elsewhere, so not here: a 100 MiB argument and result through a real worker
(test_binary.py), TLS with each transport (test_tls_vocabulary.py, test_executor.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import pytest

from wove.environment import ExecutorRuntime
from wove.errors import EnvironmentExecutionError
from wove.testing import tasks

from .conftest import Worker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

TRANSPORTS = ["native", "aiohttp", "httpx"]
#: the bound a failing call must end within (a hang fails the test, it does not stall the run)
BOUND = 20.0

Head = list[tuple[bytes, bytes]]


def _env(url: str, **config: Any) -> dict[str, Any]:
    return {"w": {"executor": "http", "executor_config": {"url": url, **config}}}


async def _read_head(reader: asyncio.StreamReader) -> tuple[bytes, Head] | None:
    """A message head (start line, headers); None when the peer closed first."""
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    start, *lines = raw[:-4].split(b"\r\n")
    headers = [(name.strip(), value.strip()) for name, _, value in (line.partition(b":") for line in lines)]
    return start, headers


def _length(headers: Head) -> int:
    return next((int(value) for name, value in headers if name.lower() == b"content-length"), 0)


def _without(headers: Head, *names: bytes) -> Head:
    return [(name, value) for name, value in headers if name.lower() not in names]


def _render(start: bytes, headers: Head) -> bytes:
    return start + b"\r\n" + b"".join(b"%s: %s\r\n" % item for item in headers) + b"\r\n"


class Front:
    """An HTTP/1.1 server in front of a real worker, misbehaving as told.

    Each POST is answered as the next entry of :attr:`plan` says (then ``"relay"``);
    other requests (the executor's ``GET <path>/health``) are relayed. Entries:

    * ``relay``: the worker's response as it sent it (Content-Length), connection kept;
    * ``drop``: the connection closed on receiving the request, nothing answered (the
      worker never sees it);
    * ``chunked``: the worker's response re-sent ``Transfer-Encoding: chunked`` (chunk
      extensions and a trailer included);
    * ``bad-chunk:<size line>``: a chunked response whose first size line is that;
    * ``until-close`` / ``until-close-silent``: no Content-Length, the body ends when the
      connection closes (with ``Connection: close``, or saying nothing);
    * ``truncated``: the head promises more body than is sent, then the connection closes;
    * ``huge-head`` / ``huge-head-unterminated``: over 64 KiB of headers before the body
      (in one write), or headers that never end.

    Attributes:
        accepted: connections accepted so far.
        peak: the most connections open at once.
        bodies: the worker's response bodies, in order.
    """

    def __init__(self, upstream: str) -> None:
        parts = urllib.parse.urlsplit(upstream)
        assert parts.hostname is not None and parts.port is not None
        self._upstream = (parts.hostname, parts.port)
        self._path = parts.path
        self.plan: list[str] = []
        self.accepted = 0
        self.open = 0
        self.peak = 0
        self.bodies: list[bytes] = []
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}{self._path}"

    async def __aenter__(self) -> Front:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        await self.close_connections()
        await self._server.wait_closed()

    async def close_connections(self) -> None:
        """Close every open connection (as a server closes idle keep-alive connections)."""
        for writer in list(self._writers):
            writer.close()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        self.accepted += 1
        self.open += 1
        self.peak = max(self.peak, self.open)
        try:
            while await self._exchange(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open -= 1
            self._writers.discard(writer)
            self._handlers.discard(task)
            writer.close()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Read one request and answer it; False when the connection is to close."""
        request = await _read_head(reader)
        if request is None:
            return False
        start, headers = request
        body = await reader.readexactly(_length(headers))
        behaviour = self.plan.pop(0) if self.plan and start.startswith(b"POST ") else "relay"
        if behaviour == "drop":
            return False
        status, answer_headers, answer = await self._relay(_render(start, headers) + body)
        if start.startswith(b"POST "):
            self.bodies.append(answer)
        plain = _without(answer_headers, b"content-length", b"transfer-encoding", b"connection")
        chunked = [*plain, (b"Transfer-Encoding", b"chunked")]
        if behaviour == "relay":
            writer.write(_render(status, answer_headers) + answer)
        elif behaviour == "chunked":
            pieces = [piece for piece in (answer[:1], answer[1:8], answer[8:]) if piece]
            writer.write(_render(status, chunked))
            for index, piece in enumerate(pieces):
                extension = b";piece=%d" % index if index == 1 else b""
                writer.write(b"%X%s\r\n%s\r\n" % (len(piece), extension, piece))
                await writer.drain()
            writer.write(b"0\r\nX-Trailer: yes\r\n\r\n")
        elif behaviour.startswith("bad-chunk:"):
            writer.write(_render(status, chunked) + behaviour.split(":", 1)[1].encode() + b"\r\n" + answer + b"\r\n")
            await self._linger(reader, writer)
            return False
        elif behaviour.startswith("until-close"):
            closing = plain if behaviour == "until-close-silent" else [*plain, (b"Connection", b"close")]
            writer.write(_render(status, closing) + answer[:5])
            await writer.drain()
            writer.write(answer[5:])
            await writer.drain()
            return False
        elif behaviour == "truncated":
            writer.write(_render(status, [*plain, (b"Content-Length", str(len(answer) + 100).encode())])
                         + answer[:len(answer) // 2])
            await writer.drain()
            return False
        elif behaviour.startswith("huge-head"):
            padding = [(b"X-Padding-%d" % i, b"p" * 1000) for i in range(100)]
            if behaviour == "huge-head":
                writer.write(_render(status, [*padding, *answer_headers]) + answer)
            else:
                writer.write(_render(status, padding)[:-2])  # no blank line: the head never ends
            await self._linger(reader, writer)
            return False
        else:  # pragma: no cover - a typo in a test
            raise AssertionError(f"unknown behaviour {behaviour!r}")
        await writer.drain()
        return True

    async def _relay(self, request: bytes) -> tuple[bytes, Head, bytes]:
        """The worker's answer to ``request`` (one connection each, closed after)."""
        reader, writer = await asyncio.open_connection(*self._upstream)
        try:
            writer.write(request)
            await writer.drain()
            head = await _read_head(reader)
            assert head is not None, "the worker closed the connection without answering"
            status, headers = head
            return status, headers, await reader.readexactly(_length(headers))
        finally:
            writer.close()

    @staticmethod
    async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Keep the connection open until the client closes it."""
        await writer.drain()
        with contextlib.suppress(ConnectionError):
            await reader.read()


async def _fails(runtime: ExecutorRuntime, **delivery: Any) -> EnvironmentExecutionError:
    """The transport error a call ends with (within BOUND seconds)."""
    with pytest.raises(EnvironmentExecutionError) as info:
        await asyncio.wait_for(runtime.call_with("w", tasks.add, (1, 2), **delivery), BOUND)
    assert info.value.payload["source"] == "transport", info.value.payload
    return info.value


# -- the pool ------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_sequential_calls_reuse_kept_alive_connections(worker: Worker, transport: str) -> None:
    async with Front(worker.url) as front, ExecutorRuntime(
            _env(front.url, transport=transport, max_connections=4), {}) as runtime:
        for i in range(30):
            assert await runtime.call("w", tasks.add, i, 1) == i + 1
        assert 1 <= front.accepted <= 4, front.accepted  # not one per call


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_concurrent_calls_stay_within_max_connections(worker: Worker, transport: str) -> None:
    async with Front(worker.url) as front, ExecutorRuntime(
            _env(front.url, transport=transport, max_connections=3), {}) as runtime:
        sleeps = [runtime.call("w", tasks.sleep, 0.2) for _ in range(9)]
        adds = [runtime.call("w", tasks.add, i, 1) for i in range(15)]
        results = await asyncio.wait_for(asyncio.gather(*sleeps, *adds), 40)
        assert results == ["slept"] * 9 + [i + 1 for i in range(15)]
        assert 1 <= front.peak <= 3, front.peak
        assert front.accepted <= 3, front.accepted  # the ones opened were kept and shared


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_an_idle_connection_past_keepalive_expiry_is_not_reused(worker: Worker, transport: str) -> None:
    async with Front(worker.url) as front, ExecutorRuntime(
            _env(front.url, transport=transport, keepalive_expiry=0.3), {}) as runtime:
        assert await runtime.call("w", tasks.add, 1, 1) == 2
        assert await runtime.call("w", tasks.add, 1, 2) == 3  # at once: the same connection
        assert front.accepted == 1
        await asyncio.sleep(0.8)
        assert await runtime.call("w", tasks.add, 1, 3) == 4
        assert front.accepted == 2


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_an_idle_connection_the_server_closed_is_not_reused(worker: Worker, transport: str) -> None:
    async with Front(worker.url) as front, ExecutorRuntime(_env(front.url, transport=transport), {}) as runtime:
        assert await runtime.call("w", tasks.add, 1, 1) == 2
        await front.close_connections()
        await asyncio.sleep(0.2)  # idle: the close has arrived
        assert await asyncio.wait_for(runtime.call("w", tasks.add, 1, 2), BOUND) == 3
        assert front.accepted == 2


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_kept_alive_connection_closed_as_the_request_arrives(worker: Worker, transport: str) -> None:
    """README: a POST on a kept-alive connection that the worker closes at that very moment
    fails as connection lost; a ``requeue`` run is delivered again."""
    async with Front(worker.url) as front, ExecutorRuntime(_env(front.url, transport=transport), {}) as runtime:
        assert await runtime.call("w", tasks.add, 1, 1) == 2
        front.plan = ["drop"]
        error = await _fails(runtime)
        assert error.payload["kind"] == "ConnectionLost", error.payload
        assert f"the connection to {front.url} was lost" in str(error)
        front.plan = ["drop"]
        assert await asyncio.wait_for(runtime.call_with(
            "w", tasks.add, (2, 2), delivery_orphan_policy="requeue"), BOUND) == 4
        assert await runtime.call("w", tasks.add, 1, 2) == 3
        assert front.plan == []


# -- response framing ----------------------------------------------------------


def _payloads() -> list[Any]:
    return [{"text": "héllo", "numbers": list(range(50))},  # a JSON answer
            {"blob": bytes(range(256)) * 2000}]  # a bulky result: binary frames


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("behaviour", ["chunked", "until-close", "until-close-silent"])
async def test_chunked_and_read_until_close_answers_decode(worker: Worker, transport: str, behaviour: str) -> None:
    async with Front(worker.url) as front, ExecutorRuntime(
            _env(front.url, transport=transport, payload_warning_bytes=False), {}) as runtime:
        for value in _payloads():
            front.plan = [behaviour]
            assert await asyncio.wait_for(runtime.call("w", tasks.echo, value), BOUND) == value
        assert front.plan == []
        assert b"task_result" in front.bodies[0]  # a real worker's answer, re-framed
        assert await runtime.call("w", tasks.add, 1, 2) == 3  # and the pool goes on


@pytest.mark.parametrize("size_line", ["zz", "-1", "0x10", "", "1" * 2000])
async def test_a_malformed_chunk_size_fails_cleanly(worker: Worker, size_line: str) -> None:
    async with Front(worker.url) as front, ExecutorRuntime(_env(front.url), {}) as runtime:
        front.plan = [f"bad-chunk:{size_line}"]
        error = await _fails(runtime)
        message = str(error)
        assert error.payload["kind"] == "ConnectionLost", error.payload
        assert front.url in message and "invalid chunk size" in message, message
        assert await runtime.call("w", tasks.add, 1, 2) == 3


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_response_cut_short_is_connection_lost(worker: Worker, transport: str) -> None:
    async with Front(worker.url) as front, ExecutorRuntime(_env(front.url, transport=transport), {}) as runtime:
        front.plan = ["truncated"]
        error = await _fails(runtime)
        assert error.payload["kind"] == "ConnectionLost", error.payload
        message = str(error)
        assert f"the connection to {front.url} was lost before the run finished" in message, message
        if transport == "native":
            assert "the server closed the connection before the response was complete" in message, message
        assert await runtime.call("w", tasks.add, 1, 2) == 3  # the next call gets a healthy answer


@pytest.mark.parametrize("behaviour", ["huge-head", "huge-head-unterminated"])
async def test_an_oversized_response_head_fails(worker: Worker, behaviour: str) -> None:
    async with Front(worker.url) as front, ExecutorRuntime(_env(front.url), {}) as runtime:
        front.plan = [behaviour]
        error = await _fails(runtime)
        message = str(error)
        assert front.url in message and "the response head is too large" in message, message
        assert "64 KiB" in message, message
        assert await runtime.call("w", tasks.add, 1, 2) == 3


# -- timeouts ------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _silent_server() -> AsyncIterator[str]:
    """Accepts connections, reads nothing and answers nothing; yields its URL."""
    writers: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/wove"
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_server_that_never_answers_is_a_read_timeout(transport: str) -> None:
    async with _silent_server() as url, ExecutorRuntime(_env(url, timeout=0.3, transport=transport), {}) as runtime:
        error = await _fails(runtime)
    message = str(error)
    assert message.startswith(f"timeout: {url} sent nothing for 0.3s (executor_config.timeout)"), message
    assert error.payload["kind"] == "Timeout", error.payload
    assert "Raise executor_config.timeout" in message

