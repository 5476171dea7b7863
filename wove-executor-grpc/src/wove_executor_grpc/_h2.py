"""A small HTTP/2 (h2c) client for gRPC unary calls on asyncio, written for the ``Send`` path.

grpc.aio spends most of a unary call's client CPU in its own machinery; this client pays only
for what one unary call needs: a request header block encoded once (HPACK literals), the DATA
frame with the 5-byte gRPC message prefix, one write per event-loop turn for every call started
in it, frames parsed from one buffer, and response header blocks decoded once and then looked up
by their bytes (grpc's C-core answers later calls with identical, table-neutral blocks).

HTTP/2 as RFC 9113 asks of a client: no stream opens before the peer's first SETTINGS (as grpc
waits for them; a connection without them for 20 s fails its calls UNAVAILABLE, as grpc's connect
timeout does), which (MAX_FRAME_SIZE, MAX_CONCURRENT_STREAMS: calls beyond it wait,
INITIAL_WINDOW_SIZE) are honoured and acknowledged, sending respects the connection and stream
flow-control windows, what is received is given back in WINDOW_UPDATEs (a large initial window
is advertised), PING is answered, CONTINUATION is joined, RST_STREAM ends its call, GOAWAY sends
new calls to a new connection, and the streams it did not process go once more on a new
connection, as grpc's transparent retry does (a second refusal fails them UNAVAILABLE: not run,
safe to deliver again). Response headers are decoded by a complete HPACK decoder (RFC 7541:
dynamic table, Huffman).

A failed call raises ``grpc.aio.AioRpcError`` with the status code and details grpc would
report, so the executor has one way to describe and re-deliver failures.
"""

from __future__ import annotations

import asyncio
import collections
import struct
from collections.abc import Callable
from urllib.parse import unquote

import grpc
import grpc.aio

__all__ = ["NativeUnaryClient"]

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _PRIORITY, _RST, _SETTINGS, _PUSH, _PING, _GOAWAY, _WINDOW, _CONTINUATION = range(10)
_END_STREAM, _ACK, _END_HEADERS, _PADDED, _PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
_HEAD = struct.Struct(">I B I")  # length<<8 | type, flags, stream id (read as 3+1+1+4 bytes below)
_U32 = struct.Struct(">I")
_PREFIX = struct.Struct(">BI")
#: the window this client gives the server (connection and each stream)
_WINDOW_SIZE = 1 << 30
_MAX_FRAME = (1 << 24) - 1
#: cached decoded header blocks (blocks without table changes)
_CACHE_SIZE = 512
#: seconds a new connection has to bring the server's first SETTINGS (grpc's minimum connect
#: timeout); then its calls fail UNAVAILABLE, as grpc's do
_SETTINGS_TIMEOUT = 20.0

# -- HPACK (RFC 7541) -------------------------------------------------------------------------
_STATIC: tuple[tuple[str, str], ...] = (
    ("", ""), (":authority", ""), (":method", "GET"), (":method", "POST"), (":path", "/"),
    (":path", "/index.html"), (":scheme", "http"), (":scheme", "https"), (":status", "200"),
    (":status", "204"), (":status", "206"), (":status", "304"), (":status", "400"), (":status", "404"),
    (":status", "500"), ("accept-charset", ""), ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""), ("accept-ranges", ""), ("accept", ""), ("access-control-allow-origin", ""),
    ("age", ""), ("allow", ""), ("authorization", ""), ("cache-control", ""),
    ("content-disposition", ""), ("content-encoding", ""), ("content-language", ""),
    ("content-length", ""), ("content-location", ""), ("content-range", ""), ("content-type", ""),
    ("cookie", ""), ("date", ""), ("etag", ""), ("expect", ""), ("expires", ""), ("from", ""),
    ("host", ""), ("if-match", ""), ("if-modified-since", ""), ("if-none-match", ""),
    ("if-range", ""), ("if-unmodified-since", ""), ("last-modified", ""), ("link", ""),
    ("location", ""), ("max-forwards", ""), ("proxy-authenticate", ""), ("proxy-authorization", ""),
    ("range", ""), ("referer", ""), ("refresh", ""), ("retry-after", ""), ("server", ""),
    ("set-cookie", ""), ("strict-transport-security", ""), ("transfer-encoding", ""),
    ("user-agent", ""), ("vary", ""), ("via", ""), ("www-authenticate", ""),
)
#: Huffman code lengths of symbols 0..256 (RFC 7541 Appendix B), one letter each ("A" = 5 bits);
#: the code is canonical, so the lengths determine the codes.
_HUFFMAN_LENGTHS = (
    "ISXXXXXXXTZXXZXXXXXXXXZXXXXXXXXXBFFHIBDGFFDGDBBBAAABBBBBBBCDKBHFIBCCCCCCCCCCCCCCCCCCCCCCDCDIOIJBKABAB"
    "ABBBACCBBBABCBAABCCCCCKGJIXPRPPRRRSRSSSSSTSTTRSTSSSSQRSRSSTRQPRRSSQSRRTQRSSQQRQSRSSPRRRSRRSVVPORSRUVVV"
    "WWVTUOQVWWVWTQQVVXWWWPTPQRQQSRRUUTTVSVWVVWWWWWXWWWWWVZ"
)


def _huffman_table() -> dict[tuple[int, int], int]:
    lengths = [ord(c) - ord("A") + 5 for c in _HUFFMAN_LENGTHS]
    table: dict[tuple[int, int], int] = {}
    code, previous = -1, lengths[0]
    for symbol in sorted(range(257), key=lambda s: (lengths[s], s)):
        code = (code + 1) << (lengths[symbol] - previous) if code >= 0 else 0
        previous = lengths[symbol]
        table[(lengths[symbol], code)] = symbol
    return table


_HUFFMAN = _huffman_table()


class HpackError(Exception):
    """A header block this decoder cannot read (a COMPRESSION_ERROR)."""


def _huffman_decode(data: bytes) -> bytes:
    out = bytearray()
    code = bits = 0
    table = _HUFFMAN
    for byte in data:
        for shift in range(7, -1, -1):
            code = (code << 1) | ((byte >> shift) & 1)
            bits += 1
            symbol = table.get((bits, code))
            if symbol is not None:
                if symbol == 256:
                    raise HpackError("EOS in a Huffman string")
                out.append(symbol)
                code = bits = 0
            elif bits > 30:
                raise HpackError("bad Huffman code")
    if bits > 7 or code != (1 << bits) - 1:
        raise HpackError("bad Huffman padding")
    return bytes(out)


class HpackDecoder:
    """RFC 7541 header block decoder (dynamic table, Huffman); blocks that leave the table as it
    was are cached by their bytes."""

    def __init__(self, max_table_size: int = 4096) -> None:
        self._table: collections.deque[tuple[str, str]] = collections.deque()
        self._size = 0
        self._max = max_table_size
        self._limit = max_table_size
        self._cache: dict[bytes, list[tuple[str, str]]] = {}

    def decode(self, block: bytes) -> list[tuple[str, str]]:
        cached = self._cache.get(block)
        if cached is not None:
            return cached
        headers, changed = self._decode(block)
        if not changed and len(self._cache) < _CACHE_SIZE:
            self._cache[block] = headers
        return headers

    def _entry(self, index: int) -> tuple[str, str]:
        if 0 < index < len(_STATIC):
            return _STATIC[index]
        try:
            return self._table[index - len(_STATIC)]
        except IndexError:
            raise HpackError(f"header index {index} out of range") from None

    def _add(self, name: str, value: str) -> None:
        size = len(name.encode()) + len(value.encode()) + 32
        self._table.appendleft((name, value))
        self._size += size
        self._evict()

    def _evict(self) -> None:
        while self._size > self._max and self._table:
            name, value = self._table.pop()
            self._size -= len(name.encode()) + len(value.encode()) + 32

    def _decode(self, data: bytes) -> tuple[list[tuple[str, str]], bool]:
        headers: list[tuple[str, str]] = []
        changed = False
        position, end = 0, len(data)

        def integer(prefix: int) -> int:
            nonlocal position
            if position >= end:
                raise HpackError("truncated header block")
            mask = (1 << prefix) - 1
            value = data[position] & mask
            position += 1
            if value < mask:
                return value
            shift = 0
            while True:
                if position >= end:
                    raise HpackError("truncated integer")
                byte = data[position]
                position += 1
                value += (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    return value
                if shift > 35:
                    raise HpackError("integer too large")

        def string() -> str:
            nonlocal position
            if position >= end:
                raise HpackError("truncated header block")
            huffman = data[position] & 0x80
            length = integer(7)
            raw = data[position:position + length]
            if len(raw) < length:
                raise HpackError("truncated string")
            position += length
            return (_huffman_decode(raw) if huffman else raw).decode("latin-1")

        while position < end:
            byte = data[position]
            if byte & 0x80:  # indexed
                index = integer(7)
                if index == 0:
                    raise HpackError("index 0")
                headers.append(self._entry(index))
            elif byte & 0x40:  # literal with incremental indexing
                index = integer(6)
                name = self._entry(index)[0] if index else string()
                value = string()
                self._add(name, value)
                headers.append((name, value))
                changed = True
            elif byte & 0x20:  # dynamic table size update
                size = integer(5)
                if size > self._limit:
                    raise HpackError("table size update over the limit")
                self._max = size
                self._evict()
                changed = True
            else:  # literal without indexing / never indexed
                index = integer(4)
                name = self._entry(index)[0] if index else string()
                headers.append((name, string()))
        return headers, changed


def _integer(value: int, prefix: int, first: int) -> bytes:
    mask = (1 << prefix) - 1
    if value < mask:
        return bytes((first | value,))
    out = bytearray((first | mask,))
    value -= mask
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: str, value: str, index: int = 0) -> bytes:
    """A literal header field without indexing (a static name index, or the name itself)."""
    raw = value.encode("latin-1")
    if index:
        head = _integer(index, 4, 0)
    else:
        key = name.encode("latin-1")
        head = b"\x00" + _integer(len(key), 7, 0) + key
    return head + _integer(len(raw), 7, 0) + raw


def _timeout_header(timeout: float) -> bytes:
    millis = max(1, int(timeout * 1000 + 0.999))
    text = f"{millis}m" if millis < 100_000_000 else f"{min(int(timeout) + 1, 99_999_999)}S"
    return _literal("grpc-timeout", text)


# -- status mapping -------------------------------------------------------------------------------
_CODES = {code.value[0]: code for code in grpc.StatusCode}
#: HTTP status -> gRPC status, for responses without grpc-status (gRPC's http-grpc-status-mapping)
_HTTP_CODES = {400: grpc.StatusCode.INTERNAL, 401: grpc.StatusCode.UNAUTHENTICATED,
               403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.UNIMPLEMENTED,
               429: grpc.StatusCode.UNAVAILABLE, 502: grpc.StatusCode.UNAVAILABLE,
               503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.UNAVAILABLE}
#: RST_STREAM error codes -> gRPC status
_RST_CODES = {0x7: grpc.StatusCode.UNAVAILABLE, 0x8: grpc.StatusCode.CANCELLED,
              0xB: grpc.StatusCode.RESOURCE_EXHAUSTED, 0xC: grpc.StatusCode.PERMISSION_DENIED}


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """The failure as grpc.aio reports it (code, details)."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


# -- streams and the connection -----------------------------------------------------------------
#: what a call's stream is answered with: the response message, or the failure
Answer = Callable[[bytes | BaseException], None]


def _settle(future: asyncio.Future[bytes]) -> Answer:
    """An :data:`Answer` that ends ``future`` (unless it ended: a cancelled caller)."""
    def answer(result: bytes | BaseException) -> None:
        if not future.done():
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
    return answer


def _unanswered(result: bytes | BaseException) -> None:
    """A stream's answer once it has been answered or given up."""


class _Stream:
    __slots__ = ("answer", "connection", "data", "done", "headers", "id", "out", "received", "status",
                 "unprocessed", "window")

    def __init__(self, answer: Answer, out: memoryview, window: int, connection: _Connection) -> None:
        self.id = 0
        self.answer = answer
        self.done = False  # answered (once), or given up by its caller
        self.connection = connection
        self.out = out  # DATA still to send
        self.window = window  # the peer's window for this stream
        self.data = bytearray()
        self.headers: list[tuple[str, str]] | None = None  # the response headers, once read
        self.received = 0  # bytes of DATA received, not yet given back by a WINDOW_UPDATE
        self.status: grpc.StatusCode | None = None
        self.unprocessed = False  # failed before the server processed it (GOAWAY): safe to send again

    def cancel(self) -> None:
        """Give the call up (RST_STREAM CANCEL when it is open); it is not answered after this."""
        if not self.done:
            self.done = True
            self.answer = _unanswered  # no cycle keeps a large call alive
            self.connection._reset(self)


class _Connection(asyncio.Protocol):
    """One HTTP/2 connection carrying many unary calls."""

    def __init__(self, client: NativeUnaryClient) -> None:
        self._client = client
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.draining = False  # GOAWAY received: no new streams
        self._buffer = bytearray()
        self._out = bytearray()
        self._flush_scheduled = False
        self._streams: dict[int, _Stream] = {}
        self._waiting: collections.deque[_Stream] = collections.deque()  # beyond MAX_CONCURRENT_STREAMS
        self._blocked: dict[int, _Stream] = {}  # streams with DATA waiting for window
        self._next_id = 1
        self._decoder = HpackDecoder()
        self._max_frame = 16384
        self._max_streams = 1 << 31
        self._initial_window = 65535
        self._window = 65535  # the peer's connection window
        self._received = 0  # connection DATA not yet given back
        self._header_id = 0  # a header block continues (CONTINUATION) on this stream
        self._header_block = bytearray()
        self._header_flags = 0
        self._paused = False
        self.settled = False  # the server's first SETTINGS arrived
        self._writable: asyncio.Future[None] | None = None
        self.lost: asyncio.Future[None] = self._loop.create_future()
        self._settings_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        # ENABLE_PUSH 0, INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE 1 MiB (fewer frames for big results)
        settings = struct.pack(">HIHIHI", 2, 0, 4, _WINDOW_SIZE, 5, 1 << 20)
        self._out += _PREFACE + self._frame(_SETTINGS, 0, 0, settings)
        self._out += self._frame(_WINDOW, 0, 0, _U32.pack(_WINDOW_SIZE - 65535))
        self._flush()
        self._settings_timer = self._loop.call_later(_SETTINGS_TIMEOUT, self._settings_overdue)

    def _settings_overdue(self) -> None:
        """No SETTINGS in time (a port that accepts but does not speak HTTP/2, a wedged
        server): the calls waiting for them fail, and later calls take a new connection."""
        if self.settled or self.closed or self.transport is None:
            return
        self.draining = True
        self._client._forget(self)
        self._fail_all(grpc.StatusCode.UNAVAILABLE, f"failed to connect to all addresses; last error: UNKNOWN: "
                       f"{self._client.target}: connection attempt timed out before receiving SETTINGS frame")
        self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._settings_timer is not None:
            self._settings_timer.cancel()
        detail = f"Connection lost: {exc}" if exc else "Socket closed"
        if not self.settled:  # as grpc says it of a connection that closed during its setup
            detail = f"failed to connect to all addresses; last error: UNAVAILABLE: {self._client.target}: {detail}"
        self._fail_all(grpc.StatusCode.UNAVAILABLE, detail)
        if not self.lost.done():
            self.lost.set_result(None)
        self._client._forget(self)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        position, size = 0, len(buffer)
        try:
            while size - position >= 9:
                length = (buffer[position] << 16) | (buffer[position + 1] << 8) | buffer[position + 2]
                if size - position - 9 < length:
                    break
                kind = buffer[position + 3]
                flags = buffer[position + 4]
                stream_id = _U32.unpack_from(buffer, position + 5)[0] & 0x7FFFFFFF
                payload = bytes(buffer[position + 9:position + 9 + length])
                position += 9 + length
                self._on_frame(kind, flags, stream_id, payload)
        except (HpackError, _ProtocolError) as exc:
            del buffer[:position]
            self._abort(f"protocol error: {exc}")
            return
        del buffer[:position]
        if self._out and not self._flush_scheduled:
            self._flush()

    # -- frames in ---------------------------------------------------------------------------
    def _on_frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self._header_id and kind != _CONTINUATION:
            raise _ProtocolError("a header block was interrupted")
        if kind == _DATA:
            self._on_data(flags, stream_id, payload)
        elif kind == _HEADERS:
            if flags & _PADDED:
                pad = payload[0]
                payload = payload[1:len(payload) - pad]
            if flags & _PRIORITY_FLAG:
                payload = payload[5:]
            self._header_block = bytearray(payload)
            self._header_flags = flags
            self._header_id = stream_id
            if flags & _END_HEADERS:
                self._on_headers()
        elif kind == _CONTINUATION:
            if stream_id != self._header_id:
                raise _ProtocolError("CONTINUATION on another stream")
            self._header_block += payload
            if flags & _END_HEADERS:
                self._on_headers()
        elif kind == _SETTINGS:
            if not flags & _ACK:
                if not self.settled and self._settings_timer is not None:
                    self._settings_timer.cancel()
                self.settled = True
                self._on_settings(payload)
        elif kind == _WINDOW:
            increment = _U32.unpack(payload)[0] & 0x7FFFFFFF
            if stream_id == 0:
                self._window += increment
                self._send_blocked()
            else:
                stream = self._streams.get(stream_id)
                if stream is not None:
                    stream.window += increment
                    if stream.out:
                        self._send_data(stream)
        elif kind == _PING:
            if not flags & _ACK:
                self._out += self._frame(_PING, _ACK, 0, payload)
        elif kind == _RST:
            stream = self._streams.pop(stream_id, None)
            if stream is not None:
                self._blocked.pop(stream_id, None)
                error = _U32.unpack(payload)[0]
                code = _RST_CODES.get(error, grpc.StatusCode.INTERNAL)
                self._finish(stream, rpc_error(code, f"Received RST_STREAM with error code {error}"))
        elif kind == _GOAWAY:
            self._on_goaway(payload)
        elif kind == _PUSH:
            raise _ProtocolError("PUSH_PROMISE though push is disabled")
        # PRIORITY and unknown frame types are ignored

    def _on_settings(self, payload: bytes) -> None:
        for offset in range(0, len(payload) - 5, 6):
            key, value = struct.unpack_from(">HI", payload, offset)
            if key == 3:
                self._max_streams = value
            elif key == 4:
                if value > 0x7FFFFFFF:
                    raise _ProtocolError("INITIAL_WINDOW_SIZE too large")
                delta = value - self._initial_window
                self._initial_window = value
                for stream in self._streams.values():
                    stream.window += delta
            elif key == 5:
                self._max_frame = min(value, _MAX_FRAME)
        self._out += self._frame(_SETTINGS, _ACK, 0, b"")
        self._send_blocked()
        self._start_waiting()

    def _on_goaway(self, payload: bytes) -> None:
        last = _U32.unpack_from(payload)[0] & 0x7FFFFFFF
        error = _U32.unpack_from(payload, 4)[0]
        self.draining = True
        self._client._forget(self)
        detail = payload[8:].decode("utf-8", "replace")
        text = f"Received GOAWAY (error code {error}{': ' + detail if detail else ''}); the call was not processed"
        for stream_id in [i for i in self._streams if i > last]:
            stream = self._streams.pop(stream_id)
            self._blocked.pop(stream_id, None)
            stream.unprocessed = True
            self._finish(stream, rpc_error(grpc.StatusCode.UNAVAILABLE, text))
        while self._waiting:
            stream = self._waiting.popleft()
            stream.unprocessed = True
            self._finish(stream, rpc_error(grpc.StatusCode.UNAVAILABLE, text))
        if not self._streams and self.transport is not None:
            self._flush()
            self.transport.close()

    def _on_headers(self) -> None:
        stream_id, flags = self._header_id, self._header_flags
        self._header_id = 0
        headers = self._decoder.decode(bytes(self._header_block))  # always: keeps the table in step
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        if stream.headers is None:
            stream.headers = headers
            status = next((v for k, v in headers if k == ":status"), "")
            if status != "200":
                code = _HTTP_CODES.get(int(status) if status.isdigit() else 0, grpc.StatusCode.UNKNOWN)
                self._close_stream(stream)
                self._finish(stream, rpc_error(code, f"Received http2 header with status: {status}"))
                return
            if flags & _END_STREAM:  # trailers-only
                self._close_stream(stream)
                self._on_trailers(stream, headers)
            return
        self._close_stream(stream)
        self._on_trailers(stream, headers)

    def _on_trailers(self, stream: _Stream, trailers: list[tuple[str, str]]) -> None:
        status = message = None
        for name, value in trailers:
            if name == "grpc-status":
                status = value
            elif name == "grpc-message":
                message = unquote(value)
        if status is None:
            self._finish(stream, rpc_error(grpc.StatusCode.UNKNOWN, "the response ended without grpc-status"))
            return
        code = _CODES.get(int(status) if status.isdigit() else -1, grpc.StatusCode.UNKNOWN)
        if code != grpc.StatusCode.OK:
            self._finish(stream, rpc_error(code, message or ""))
            return
        data = stream.data
        if len(data) < 5:
            self._finish(stream, rpc_error(grpc.StatusCode.INTERNAL, "the response carried no message"
                                           if not data else "truncated gRPC message"))
            return
        flag, length = _PREFIX.unpack_from(data)
        if flag:
            self._finish(stream, rpc_error(grpc.StatusCode.INTERNAL, "compressed message without grpc-encoding"))
        elif len(data) != 5 + length:
            self._finish(stream, rpc_error(grpc.StatusCode.INTERNAL, "the response is not one gRPC message"))
        else:
            self._finish(stream, bytes(memoryview(data)[5:]))

    def _on_data(self, flags: int, stream_id: int, payload: bytes) -> None:
        if flags & _PADDED:
            pad = payload[0]
            counted = len(payload)
            payload = payload[1:len(payload) - pad]
        else:
            counted = len(payload)
        self._received += counted
        if self._received > _WINDOW_SIZE >> 1:
            self._out += self._frame(_WINDOW, 0, 0, _U32.pack(self._received))
            self._received = 0
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        stream.data += payload
        stream.received += counted
        if stream.received > _WINDOW_SIZE >> 1 and not flags & _END_STREAM:
            self._out += self._frame(_WINDOW, 0, stream_id, _U32.pack(stream.received))
            stream.received = 0
        limit = self._client.max_receive
        if limit is not None and len(stream.data) >= 5:
            size = _U32.unpack_from(stream.data, 1)[0]
            if size > limit:
                self._reset(stream)
                self._finish(stream, rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                               f"Received message larger than max ({size} vs. {limit})"))
                return
        if flags & _END_STREAM:
            self._close_stream(stream)
            self._finish(stream, rpc_error(grpc.StatusCode.INTERNAL, "the response ended without trailers"))

    # -- frames out --------------------------------------------------------------------------
    @staticmethod
    def _frame(kind: int, flags: int, stream_id: int, payload: bytes | memoryview) -> bytes:
        return _HEAD.pack((len(payload) << 8) | kind, flags, stream_id) + payload

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self.transport is not None and not self.closed:
            self.transport.write(bytes(self._out))
        self._out.clear()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def start(self, stream: _Stream, block: bytes) -> None:
        """Send (or queue: before the server's first SETTINGS, as grpc waits for them, or beyond
        MAX_CONCURRENT_STREAMS) a call's HEADERS and DATA. A stream opened before SETTINGS may
        exceed a limit the client does not know yet, and grpc's server refuses it."""
        if self.closed or self.draining:  # lost, or GOAWAY, since the caller took this connection
            stream.unprocessed = True
            self._finish(stream, rpc_error(grpc.StatusCode.UNAVAILABLE, "the connection was closing; "
                                           "the call was not processed"))
            return
        if not self.settled or len(self._streams) >= self._max_streams:
            stream.headers = None
            self._waiting.append(stream)
            stream.data = bytearray(block)  # the header block waits with it
            return
        self._open(stream, block)

    def _open(self, stream: _Stream, block: bytes) -> None:
        stream.id = stream_id = self._next_id
        self._next_id += 2
        self._streams[stream_id] = stream
        stream.window = self._initial_window
        limit = self._max_frame
        out = self._out
        if len(block) <= limit:
            out += self._frame(_HEADERS, _END_HEADERS, stream_id, block)
        else:
            out += self._frame(_HEADERS, 0, stream_id, block[:limit])
            for offset in range(limit, len(block), limit):
                last = offset + limit >= len(block)
                out += self._frame(_CONTINUATION, _END_HEADERS if last else 0, stream_id, block[offset:offset + limit])
        self._send_data(stream)
        self._schedule_flush()
        if self._next_id > 0x7FFFFFFF - 2:  # out of stream ids: new calls go to a new connection
            self.draining = True
            self._client._forget(self)

    def _send_data(self, stream: _Stream) -> None:
        data = stream.out
        while data:
            size = min(len(data), self._max_frame, stream.window, self._window)
            if size <= 0:
                self._blocked[stream.id] = stream
                break
            chunk, data = data[:size], data[size:]
            stream.window -= size
            self._window -= size
            self._out += self._frame(_DATA, 0 if data else _END_STREAM, stream.id, chunk)
            if len(self._out) > 1 << 20:
                self._flush()
        else:
            self._blocked.pop(stream.id, None)
        stream.out = data

    def _send_blocked(self) -> None:
        for stream in list(self._blocked.values()):
            if self._window <= 0:
                break
            self._send_data(stream)

    def _close_stream(self, stream: _Stream) -> None:
        self._streams.pop(stream.id, None)
        self._blocked.pop(stream.id, None)
        self._start_waiting()

    def _start_waiting(self) -> None:
        while self._waiting and self.settled and len(self._streams) < self._max_streams and not self.draining:
            stream = self._waiting.popleft()
            if stream.done:
                continue
            block = bytes(stream.data)
            stream.data = bytearray()
            self._open(stream, block)
        if self.draining and not self._streams and self.transport is not None and not self.closed:
            self._flush()
            self.transport.close()

    def _reset(self, stream: _Stream, error: int = 0x8) -> None:
        """RST_STREAM (CANCEL) a call that is given up."""
        if stream in self._waiting:
            self._waiting.remove(stream)
            return
        if self._streams.pop(stream.id, None) is not None:
            self._blocked.pop(stream.id, None)
            self._out += self._frame(_RST, 0, stream.id, _U32.pack(error))
            self._schedule_flush()
            self._start_waiting()

    def _finish(self, stream: _Stream, result: bytes | BaseException) -> None:
        if not stream.done:
            stream.done = True
            answer, stream.answer = stream.answer, _unanswered  # no cycle keeps a large call alive
            answer(result)

    def _fail_all(self, code: grpc.StatusCode, detail: str) -> None:
        streams = [*self._streams.values(), *self._waiting]
        self._streams.clear()
        self._waiting.clear()
        self._blocked.clear()
        for stream in streams:
            self._finish(stream, rpc_error(code, detail))

    def _abort(self, detail: str) -> None:
        if self.transport is not None and not self.closed:
            self._out += self._frame(_GOAWAY, 0, 0, struct.pack(">II", 0, 1))
            self._flush()
            self._fail_all(grpc.StatusCode.INTERNAL, detail)
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self._out += self._frame(_GOAWAY, 0, 0, struct.pack(">II", 0, 0))
            self._flush()
            self.transport.close()


class _ProtocolError(Exception):
    """The peer broke HTTP/2."""


class NativeUnaryClient:
    """Unary gRPC calls of one method over h2c to ``host:port``.

    ``await client(body, metadata=..., timeout=...)`` returns the response message or raises
    ``grpc.aio.AioRpcError`` like a grpc.aio unary-unary callable.
    """

    def __init__(self, host: str, port: int, path: str, *, metadata: tuple[tuple[str, str], ...] = (),
                 max_send: int | None = None, max_receive: int | None = None) -> None:
        self.host, self.port = host, port
        self.max_send = max_send
        self.max_receive = max_receive
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.target = authority
        self._path = path
        fixed = b"\x83\x86" + _literal(":path", path, 4) + _literal(":authority", authority, 1)
        fixed += _literal("content-type", "application/grpc", 31) + _literal("te", "trailers")
        fixed += _literal("user-agent", "wove-grpc-native", 58)
        self._block = fixed + b"".join(_literal(k.lower(), v) for k, v in metadata)
        self._connection: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None
        self._closed = False
        self._all: set[_Connection] = set()

    def _forget(self, connection: _Connection) -> None:
        if self._connection is connection:
            self._connection = None
        if connection.closed:
            self._all.discard(connection)

    async def _connect(self) -> _Connection:
        connection = self._connection
        if connection is not None and not connection.closed and not connection.draining:
            return connection
        if self._connecting is not None:
            return await asyncio.shield(self._connecting)
        loop = asyncio.get_running_loop()
        self._connecting = loop.create_future()
        try:
            try:
                _, protocol = await loop.create_connection(lambda: _Connection(self), self.host, self.port)
            except OSError as exc:
                reason = exc.strerror or str(exc)
                raise rpc_error(grpc.StatusCode.UNAVAILABLE, f"failed to connect to all addresses; last error: "
                                f"UNKNOWN: {self.target}: Failed to connect to remote host: {reason}") from exc
            assert isinstance(protocol, _Connection)
            if self._closed:
                protocol.close()
                raise rpc_error(grpc.StatusCode.CANCELLED, "the channel is closed")
            self._connection = protocol
            self._all.add(protocol)
            self._connecting.set_result(protocol)
            return protocol
        except BaseException as exc:
            self._connecting.set_exception(exc)
            self._connecting.exception()  # retrieved: waiters get it from shield
            raise
        finally:
            self._connecting = None

    async def __call__(self, body: bytes, *, metadata: tuple[tuple[str, str], ...] | None = None,
                       timeout: float | None = None, retry_unprocessed: bool = True) -> bytes:
        """One unary call: its response message, or the ``grpc.aio.AioRpcError`` it ended
        with. A call the server did not process (GOAWAY) goes once more on a new
        connection unless ``retry_unprocessed`` is False (the caller already sent it again
        once: a call started with :meth:`start` that failed so)."""
        if self._closed:
            raise rpc_error(grpc.StatusCode.CANCELLED, "the channel is closed")
        if self.max_send is not None and len(body) > self.max_send:
            raise rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"Sent message larger than max ({len(body)} vs. {self.max_send})")
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        block = self._block
        if metadata:
            block += b"".join(_literal(k.lower(), v) for k, v in metadata)
        message = _PREFIX.pack(0, len(body)) + body
        retried = not retry_unprocessed
        while True:
            connection = self._connection
            if connection is None or connection.closed or connection.draining:
                connect = self._connect()
                try:
                    connection = await (connect if deadline is None else
                                        asyncio.wait_for(connect, deadline - loop.time()))
                except asyncio.TimeoutError:
                    raise rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
            headers = block
            if deadline is not None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
                headers = block + _timeout_header(remaining)
            future: asyncio.Future[bytes] = loop.create_future()
            stream = _Stream(_settle(future), memoryview(message), 0, connection)
            connection.start(stream, headers)
            timer = None if deadline is None else loop.call_at(deadline, self._expire, connection, stream)
            try:
                return await future
            except grpc.aio.AioRpcError:
                # as grpc does (a transparent retry): a call the server did not process goes
                # once more, on a new connection
                if not stream.unprocessed or retried or self._closed:
                    raise
                retried = True
            except asyncio.CancelledError:
                if not future.done() or future.cancelled():
                    stream.cancel()
                raise
            finally:
                if timer is not None:
                    timer.cancel()

    def start(self, body: bytes, answer: Answer, *, metadata: tuple[tuple[str, str], ...] | None = None
              ) -> _Stream | None:
        """Start a call without a deadline on the open connection; ``answer`` gets its response
        or its failure (once, from the connection's callbacks: no task, no future). None, and
        nothing sent, when there is no open connection (or the body is over ``max_send``):
        ``await client(...)`` then connects (or raises) as usual. A failed stream says
        whether the server left it unprocessed (``stream.unprocessed``: safe to send again);
        ``stream.cancel()`` gives the call up."""
        connection = self._connection
        if (self._closed or connection is None or connection.closed or connection.draining
                or (self.max_send is not None and len(body) > self.max_send)):
            return None
        block = self._block
        if metadata:
            block += b"".join(_literal(k.lower(), v) for k, v in metadata)
        stream = _Stream(answer, memoryview(_PREFIX.pack(0, len(body)) + body), 0, connection)
        connection.start(stream, block)
        return stream

    @staticmethod
    def _expire(connection: _Connection, stream: _Stream) -> None:
        if not stream.done:
            connection._reset(stream)
            connection._finish(stream, rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))

    async def close(self) -> None:
        """Close every connection (GOAWAY); calls still running end UNAVAILABLE/CANCELLED."""
        self._closed = True
        for connection in list(self._all):
            connection.close()
        for connection in list(self._all):
            try:
                await asyncio.wait_for(asyncio.shield(connection.lost), 1.0)
            except asyncio.TimeoutError:
                if connection.transport is not None:
                    connection.transport.abort()
        self._all.clear()
        self._connection = None
