"""A small HTTP/1.1 keep-alive client on asyncio Protocols, built for the executor's one job.

One POST (or GET) per exchange on a pooled connection: the request head is written with
the body's parts (large buffers from the caller's memory, in slices, honouring the
transport's flow control); the response is parsed as it arrives (status line, raw headers,
``Content-Length``, chunked, or until the peer closes), its body handed over as the bytes
come. No httpx Request/Response objects are built: with 256 requests in flight, their
construction and httpx-aiohttp's/aiohttp's per-request machinery cost more CPU than the
request itself.

Failures raise httpx's own exception types (``ConnectError``, ``ConnectTimeout``,
``ReadTimeout``, ``WriteTimeout``, ``RemoteProtocolError``, ``WriteError``) chained to the
``OSError``/``ssl`` error underneath, so the executor's one failure table describes them
as it describes httpx's and aiohttp's.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx

__all__ = ["NativePool", "NativeResponse"]

#: the head of a response may not be larger
_MAX_HEAD = 64 * 1024
#: a chunk size line (size and extensions) may not be longer
_MAX_CHUNK_LINE = 1024
_HEXDIGITS = b"0123456789abcdefABCDEF"
#: a large body part is written in slices of this size (the transport copies what the
#: socket does not take at once: slices bound that copy)
_WRITE_SLICE = 1024 * 1024
#: reading pauses while this many body bytes wait for the consumer
_READ_HIGH_WATER = 4 * 1024 * 1024

# parser states
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _UNTIL_CLOSE, _DONE = range(8)


class _Connection(asyncio.Protocol):
    """One keep-alive connection and the parser of the response of its current exchange."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._state = _DONE
        self._buf: bytes = b""
        self._remaining = 0
        self.status: int | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = True
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._error: BaseException | None = None
        self._head_waiter: asyncio.Future[None] | None = None
        self._body_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._writing_paused = False
        self.written = False  # the request was written in full
        self.last_activity = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timeout: float | None = None

    # -- asyncio.Protocol ------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):  # not TCP (or already set)
                pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._state == _UNTIL_CLOSE and exc is None:
            self._state = _DONE
            self.keep_alive = False
            self._wake_body()
        elif self._state != _DONE:
            self._fail(httpx.RemoteProtocolError(
                "the server closed the connection before the response was complete"
                if self.status is not None else "the server closed the connection without sending a response"),
                exc)
        if self._drain_waiter is not None and not self._drain_waiter.done():
            error = httpx.WriteError(f"the connection was lost while sending the request: {exc or 'closed'}")
            error.__cause__ = exc
            self._drain_waiter.set_exception(error)
        self._cancel_timer()

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost says what it means

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self.last_activity = self.loop.time()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._timer is not None:
            self.last_activity = self.loop.time()
        if self._buf:
            data = self._buf + data
            self._buf = b""
        try:
            self._parse(data)
        except httpx.RemoteProtocolError as exc:
            self._fail(exc, None)
            self.close()

    # -- parsing -----------------------------------------------------------------
    def _parse(self, data: bytes) -> None:
        pos = 0
        end = len(data)
        while pos < end:
            state = self._state
            if state == _HEAD:
                index = data.find(b"\r\n\r\n", pos)
                if (end if index < 0 else index) - pos > _MAX_HEAD:  # arrived in one read or in many
                    raise httpx.RemoteProtocolError(f"the response head is too large (over {_MAX_HEAD // 1024} KiB)")
                if index < 0:
                    self._buf = data[pos:]
                    return
                head_end = index + 4
                if self._head(data[pos:index]):
                    pos = head_end
                    continue  # an interim 1xx response: the real one follows
                pos = head_end
            elif state == _LENGTH:
                take = min(self._remaining, end - pos)
                self._body(data[pos:pos + take] if pos or take != end else data)
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._finish()
            elif state == _CHUNK_SIZE:
                index = data.find(b"\r\n", pos)
                if (end if index < 0 else index) - pos > _MAX_CHUNK_LINE:
                    raise httpx.RemoteProtocolError(f"invalid chunk size line (over {_MAX_CHUNK_LINE} bytes)")
                if index < 0:
                    self._buf = data[pos:]
                    return
                line = data[pos:index].split(b";", 1)[0].strip(b" \t")
                # 1*HEXDIG (RFC 9112): int(line, 16) alone would take "-1", "0x10" and "1_0"
                if not 0 < len(line) <= 16 or line.strip(_HEXDIGITS):
                    raise httpx.RemoteProtocolError(f"invalid chunk size {line[:20]!r}")
                size = int(line, 16)
                pos = index + 2
                if size:
                    self._remaining = size
                    self._state = _CHUNK_DATA
                else:
                    self._state = _TRAILERS
            elif state == _CHUNK_DATA:
                take = min(self._remaining, end - pos)
                self._body(data[pos:pos + take])
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = _CHUNK_END
            elif state == _CHUNK_END:
                if end - pos < 2:
                    self._buf = data[pos:]
                    return
                if data[pos:pos + 2] != b"\r\n":
                    raise httpx.RemoteProtocolError("a chunk does not end with CRLF")
                pos += 2
                self._state = _CHUNK_SIZE
            elif state == _TRAILERS:
                if data.startswith(b"\r\n", pos):  # the empty line that ends the body
                    pos += 2
                    self._finish()
                    continue
                index = data.find(b"\r\n", pos)
                if index < 0:
                    if end - pos > _MAX_HEAD:
                        raise httpx.RemoteProtocolError("the trailers are too large")
                    self._buf = data[pos:]
                    return
                pos = index + 2  # a trailer line: skipped
            elif state == _UNTIL_CLOSE:
                self._body(data[pos:] if pos else data)
                return
            else:  # _DONE: bytes nobody asked for
                raise httpx.RemoteProtocolError("the server sent data after the response")

    def _head(self, head: bytes) -> bool:
        """Parse a response head; True when it was an interim (1xx) response."""
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        try:
            if not parts[0].startswith(b"HTTP/1."):
                raise ValueError(parts[0])
            status = int(parts[1])
        except (ValueError, IndexError):
            raise httpx.RemoteProtocolError(f"invalid status line {lines[0][:80]!r}") from None
        if 100 <= status < 200 and status != 101:
            return True
        headers = []
        length: int | None = None
        chunked = False
        keep_alive = parts[0] != b"HTTP/1.0"
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                raise httpx.RemoteProtocolError(f"invalid header line {line[:80]!r}")
            value = value.strip()
            headers.append((name, value))
            lower = name.lower()
            if lower == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    raise httpx.RemoteProtocolError(f"invalid Content-Length {value[:40]!r}") from None
            elif lower == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif lower == b"connection":
                token = value.lower()
                if b"close" in token:
                    keep_alive = False
                elif b"keep-alive" in token:
                    keep_alive = True
        self.status = status
        self.headers = headers
        self.keep_alive = keep_alive
        if status in (204, 304) or self._head_only:
            self._state = _DONE
        elif chunked:
            self._state = _CHUNK_SIZE
        elif length is not None:
            self._remaining = length
            self._state = _LENGTH if length else _DONE
        else:
            self._state = _UNTIL_CLOSE
            self.keep_alive = False
        if self._state == _DONE:
            self._finish()
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        return False

    def _body(self, data: bytes) -> None:
        if not data:
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > _READ_HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake_body()

    def _finish(self) -> None:
        self._state = _DONE
        self._cancel_timer()
        self._wake_body()

    def _wake_body(self) -> None:
        waiter = self._body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: BaseException, cause: BaseException | None) -> None:
        if self._error is not None:
            return
        if cause is not None:
            error.__cause__ = cause
        self._error = error
        self._state = _DONE
        self.keep_alive = False
        for waiter in (self._head_waiter, self._body_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_exception(error)
        self._cancel_timer()

    # -- one exchange ------------------------------------------------------------
    def begin(self, timeout: float | None, *, head_only: bool = False) -> None:
        """Reset the parser for a new response; ``timeout``: seconds the peer may stay silent."""
        self._state = _HEAD
        self._head_only = head_only
        self._buf = b""
        self.status = None
        self.headers = []
        self._chunks = []
        self._buffered = 0
        self._error = None
        self.written = False
        self._timeout = timeout
        if timeout is not None:
            self.last_activity = now = self.loop.time()
            self._timer = self.loop.call_at(now + timeout, self._check_silence)

    def _check_silence(self) -> None:
        self._timer = None
        timeout = self._timeout
        if timeout is None or self._state == _DONE:
            return
        deadline = self.last_activity + timeout
        if deadline > self.loop.time() + 0.001:
            self._timer = self.loop.call_at(deadline, self._check_silence)
            return
        error: httpx.TimeoutException = (httpx.ReadTimeout if self.written else httpx.WriteTimeout)(
            f"the server sent nothing for {timeout:g}s")
        error.__cause__ = TimeoutError()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_exception(error)
        self._fail(error, error.__cause__)
        self.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def write(self, head: bytes, parts: Sequence[bytes | memoryview]) -> None:
        """Write the request: ``head`` and the body's parts. Stops early (without error)
        when the response head arrived first (a 413 while the body is still going)."""
        transport = self.transport
        assert transport is not None
        if not parts:
            transport.write(head)
        elif len(parts) == 1 and len(parts[0]) <= _WRITE_SLICE:
            part = parts[0]
            transport.write(head + part if isinstance(part, bytes) else head + bytes(part))
        else:
            transport.write(head)
            for part in parts:
                view = memoryview(part).cast("B")
                for start in range(0, len(view), _WRITE_SLICE):
                    if self.status is not None or self._error is not None:
                        self.keep_alive = False  # the body was not sent in full
                        return
                    transport.write(view[start:start + _WRITE_SLICE])
                    if self._writing_paused:
                        await self._drain()
        if self._writing_paused:
            await self._drain()
        self.written = True

    async def _drain(self) -> None:
        if self.closed:
            raise httpx.WriteError("the connection was lost while sending the request")
        self._drain_waiter = waiter = self.loop.create_future()
        try:
            await waiter
        finally:
            self._drain_waiter = None

    async def wait_head(self) -> None:
        if self.status is not None:
            return
        if self._error is not None:
            raise self._error
        self._head_waiter = self.loop.create_future()
        try:
            await self._head_waiter
        finally:
            self._head_waiter = None

    @property
    def complete(self) -> bool:
        """The whole response arrived and was taken."""
        return self._state == _DONE and self._error is None and not self._chunks

    def take(self) -> list[bytes]:
        chunks, self._chunks = self._chunks, []
        self._buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return chunks

    async def more(self) -> bool:
        """Wait for body bytes; False at the end of the body."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._state == _DONE:
                return False
            self._body_waiter = self.loop.create_future()
            try:
                await self._body_waiter
            finally:
                self._body_waiter = None
        return True

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    _head_only = False


class NativeResponse:
    """A response of :class:`NativePool`: status, raw headers, the body as it arrives.

    Give it back with :meth:`aclose` (the connection returns to the pool when the whole
    body was read; otherwise it is closed)."""

    __slots__ = ("_conn", "_pool", "headers", "status")

    def __init__(self, pool: NativePool, conn: _Connection) -> None:
        self._pool = pool
        self._conn = conn
        self.status: int = conn.status or 0
        self.headers = conn.headers

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive (chunked framing removed).

        Raises:
            httpx.RemoteProtocolError: the peer closed the connection mid-body.
            httpx.ReadTimeout: it stayed silent for longer than the read timeout.
        """
        conn = self._conn
        while await conn.more():
            for chunk in conn.take():
                yield chunk

    async def aread(self) -> bytes:
        """The whole body."""
        conn = self._conn
        chunks: list[bytes] = []
        while await conn.more():
            chunks.extend(conn.take())
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None  # type: ignore[assignment]
        if conn is not None:
            self._pool.release(conn)


class NativePool:
    """Keep-alive connections to one ``host:port`` (TLS with ``ssl_context``), at most
    ``max_connections`` at once (more requests wait their turn), ``max_keepalive`` of them
    kept while idle, each for ``keepalive_expiry`` seconds."""

    def __init__(self, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None,
                 server_hostname: str | None = None, max_connections: int = 512,
                 max_keepalive: int | None = None, keepalive_expiry: float = 30.0,
                 connect_timeout: float = 10.0) -> None:
        self._host = host.strip("[]")
        self._port = port
        self._ssl = ssl_context
        self._server_hostname = (server_hostname or self._host) if ssl_context is not None else None
        self._max = max_connections
        self._max_keepalive = max_connections if max_keepalive is None else max_keepalive
        self._expiry = keepalive_expiry
        self._connect_timeout = connect_timeout
        self._idle: list[_Connection] = []
        self._count = 0  # connections open or being opened
        self._waiters: collections.deque[asyncio.Future[_Connection | None]] = collections.deque()
        self._closed = False

    # -- public ------------------------------------------------------------------
    async def request(self, method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]],
                      parts: Sequence[bytes | memoryview], *, timeout: float | None) -> NativeResponse:
        """Send one request and return once the response head arrived. ``headers`` are
        sent as given (Host and Content-Length included); ``timeout``: seconds the server
        may stay silent.

        Raises:
            httpx.ConnectError: no connection (the OSError or ssl error is its cause).
            httpx.ConnectTimeout: none within connect_timeout.
            httpx.WriteError / httpx.RemoteProtocolError: the connection was lost.
            httpx.ReadTimeout / httpx.WriteTimeout: the server stayed silent too long.
        """
        head = b"%s %s HTTP/1.1\r\n%s\r\n" % (method, target, b"".join([b"%s: %s\r\n" % item for item in headers]))
        conn = await self._acquire()
        try:
            conn.begin(timeout, head_only=method == b"HEAD")
            try:
                await conn.write(head, parts)
            except httpx.HTTPError:
                if conn.status is None:
                    raise
            await conn.wait_head()
        except BaseException:
            self.release(conn, force_close=True)
            raise
        return NativeResponse(self, conn)

    def release(self, conn: _Connection, *, force_close: bool = False) -> None:
        """Give a connection back: to the pool when its exchange completed, else closed."""
        if conn.closed or force_close or not conn.keep_alive or not conn.complete or self._closed:
            conn._cancel_timer()
            if not conn.closed:
                conn.abort() if not conn.complete else conn.close()
            self._count -= 1
            self._wake(None)
            return
        conn._cancel_timer()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        if len(self._idle) >= self._max_keepalive:
            conn.close()
            self._count -= 1
            return
        conn.idle_since = conn.loop.time()
        self._idle.append(conn)

    async def aclose(self) -> None:
        """Close every idle connection; connections in use close when given back."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
            self._count -= 1
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(httpx.PoolTimeout("the connection pool was closed"))

    # -- internals ---------------------------------------------------------------
    def _wake(self, conn: _Connection | None) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return

    async def _acquire(self) -> _Connection:
        if self._closed:
            raise httpx.PoolTimeout("the connection pool is closed")
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.closed:
                self._count -= 1
                continue
            if conn.loop.time() - conn.idle_since > self._expiry:
                conn.close()
                self._count -= 1
                continue
            return conn
        while self._count >= self._max:
            waiter: asyncio.Future[_Connection | None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                given = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    passed = waiter.result()
                    if passed is not None:
                        self.release(passed)
                    else:
                        self._wake(None)
                raise
            if given is not None:
                if not given.closed:
                    return given
                self._count -= 1
            if self._closed:
                raise httpx.PoolTimeout("the connection pool is closed")
        self._count += 1
        try:
            return await self._connect()
        except BaseException:
            self._count -= 1
            self._wake(None)
            raise

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout) if hasattr(asyncio, "timeout") else _Deadline(
                    self._connect_timeout):
                return await self._open(loop)
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"no connection within {self._connect_timeout:g}s") from exc
        except (OSError, ssl.SSLError) as exc:  # ssl.SSLError is an OSError too
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc

    async def _open(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        try:
            ipaddress.ip_address(self._host)
            addresses = [self._host]
        except ValueError:
            infos = await loop.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM)
            addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        error: OSError | None = None
        for address in addresses:  # in order; the last error tells when none answers
            try:
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop), address, self._port, ssl=self._ssl,
                    server_hostname=self._server_hostname, ssl_handshake_timeout=self._connect_timeout
                    if self._ssl is not None else None)
                return conn
            except ssl.SSLError:
                raise
            except OSError as exc:
                error = exc
        assert error is not None
        raise error


class _Deadline:
    """``asyncio.timeout`` for Python 3.10: cancel the current task after ``delay``,
    raising TimeoutError instead of CancelledError."""

    def __init__(self, delay: float) -> None:
        self._delay = delay
        self._handle: asyncio.TimerHandle | None = None
        self._expired = False
        self._task: asyncio.Task[Any] | None = None

    async def __aenter__(self) -> _Deadline:
        self._task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        self._handle = loop.call_later(self._delay, self._expire)
        return self

    def _expire(self) -> None:
        self._expired = True
        if self._task is not None:
            self._task.cancel()

    async def __aexit__(self, kind: Any, exc: Any, tb: Any) -> bool:
        if self._handle is not None:
            self._handle.cancel()
        if self._expired and kind is asyncio.CancelledError:
            raise TimeoutError from exc
        return False
