"""The ``websocket`` executor: every run of an environment over one WebSocket connection.

Commands go out as text messages (one JSON frame each); the worker service answers on
the same connection with events as they happen (one event, a list, or
``{"events": [...]}`` per message). With a worker that announces ``binary_frames`` in its
handshake answer (``X-Wove-Capabilities``; the executor asks for it with the same header
in its request), a command or event that carries bulky data (large bytes or strings,
buffers, arrays, objects) travels as a binary message holding binary frames
(:func:`wove.protocol.encode_binary_parts`), the large buffers written as WebSocket
fragments without copying them into one message; small ones stay JSON text messages,
which are cheaper to encode and decode. When the connection drops the executor reconnects
with exponential backoff and jitter; runs in flight are delivered again when their
orphan policy is ``requeue`` (the worker deduplicates by ``run_id``) and otherwise end
with a ``task_error`` (source ``transport``) naming the URL. ``websockets`` is imported
in :meth:`WebSocketEnvironmentExecutor.start`.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import socket
import ssl
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeAlias

from wove.errors import ConfigError, ProtocolError, exception_chain
from wove.framing import ChunkAssembler, capability_names, chunks, worth_binary
from wove.options import (
    DICT,
    NON_NEGATIVE_SECONDS,
    PAYLOAD_OPTIONS,
    POSITIVE_INT,
    REDELIVERY_OPTIONS,
    STR,
    Kind,
    Option,
    OptionSpec,
    one_of,
)
from wove.protocol import (
    CAPABILITY_BINARY_CHUNKS,
    CAPABILITY_BINARY_FRAMES,
    CAPABILITY_COMMAND_LISTS,
    TERMINAL_EVENTS,
    SplitFrame,
    decode_events,
    encode_binary_parts,
    encode_frame,
    transport_error_event,
)
from wove.registry import install_hint
from wove.security import (
    NetworkExecutorSecurity,
    canonical_http_target,
    ensure_secure_target,
    is_local_url,
)
from wove.tls import INSECURE_OPTION, TLS_OPTIONS, client_ssl_context, tls_settings
from wove.transport import FrameExecutor

from .frames import CHUNK_BYTES, FRAGMENT_BYTES, fragments

__all__ = [
    "DEFAULT_MAX_SIZE",
    "FAILURES",
    "LIST_BYTES",
    "LIST_COMMANDS",
    "LIST_ITEM_BYTES",
    "OWN_FRAME_BYTES",
    "WEBSOCKET_OPTIONS",
    "FailureRule",
    "TransportFailure",
    "WebSocketEnvironmentExecutor",
    "describe_failure",
]

logger = logging.getLogger(__name__)

#: Largest incoming message (``max_size``; the library's own default of 1 MiB would drop
#: the connection on a 1 MiB result). Outgoing commands are limited by
#: ``max_message_bytes`` (:data:`wove.options.PAYLOAD_OPTIONS`, also 256 MiB).
DEFAULT_MAX_SIZE = 256 * 1024 * 1024
#: The handshake header both sides name their capabilities in.
CAPABILITIES_HEADER = "X-Wove-Capabilities"

#: A number of seconds, or None/false: off (None counts as "off" for these keys, as it
#: always did; see ``_off_or``).
_SECONDS_OR_OFF = Kind("a non-negative number of seconds, or None/false (off)",
                       lambda v: v if v is False else NON_NEGATIVE_SECONDS.check(v))
_OFF_KEYS = ("open_timeout", "ping_interval", "ping_timeout", "close_timeout", "max_size")

#: The websocket executor's ``executor_config`` keys (see :mod:`wove.options`; the TLS
#: keys are :data:`wove.tls.TLS_OPTIONS`, shared with http and grpc: ``ssl``,
#: ``certfile`` and ``keyfile`` are their older spellings here).
WEBSOCKET_OPTIONS = OptionSpec("websocket", [
    Option("url", STR, required=True, doc="ws:// or wss:// URL of the worker service, path included"),
    Option("security", doc="handshake signing: 'env:VAR', {'type': 'signed'|'bearer', ...} or 'none'"),
    Option("headers", DICT, doc="extra handshake headers (values are sent as str())"),
    Option("open_timeout", _SECONDS_OR_OFF, 10.0, "seconds for the TCP + TLS + WebSocket handshake"),
    Option("ping_interval", _SECONDS_OR_OFF, 20.0, "seconds between keepalive pings (None: no pings)"),
    Option("ping_timeout", _SECONDS_OR_OFF, 20.0, "seconds a pong may take before the connection is dropped"),
    Option("close_timeout", _SECONDS_OR_OFF, 2.0, "seconds to wait for the closing handshake in stop()"),
    Option("max_size", Kind("a positive integer (bytes) or false", lambda v: v if v is False else POSITIVE_INT.check(v)),
           DEFAULT_MAX_SIZE, "largest incoming message (event) in bytes (None: no limit)"),
    Option("compression", one_of("deflate"), doc="'deflate' enables permessage-deflate"),
    INSECURE_OPTION,
    TLS_OPTIONS,
    REDELIVERY_OPTIONS,
    PAYLOAD_OPTIONS,
])

#: The most commands, and bytes, in one list message to a ``command_lists`` worker: the
#: worker reads a message as a whole before it starts the runs in it, so a list stays
#: short enough that client and worker keep overlapping.
LIST_COMMANDS = 64
LIST_BYTES = 256 * 1024
#: A command larger than this goes as its own message (so it alone meets the worker's
#: message limit); a worker announces ``command_lists`` only while it takes 1 MiB messages.
LIST_ITEM_BYTES = 16 * 1024


def _as_list(texts: list[bytes]) -> bytes:
    """JSON commands as one message: a JSON list (a single command as itself)."""
    return texts[0] if len(texts) == 1 else b"[" + b",".join(texts) + b"]"


class _Chunks(list):  # type: ignore[type-arg]
    """A large binary frame as chunk messages (:func:`chunks`), for a ``binary_chunks`` worker."""


# What ``_Connection.outbox`` and ``_Waiting`` hold: one encoded message. ``bytes`` is a
# JSON text (it starts with ``{``) or one joined binary message (it starts with a NUL);
# a list is a large binary message as its fragments (:func:`fragments`), a ``_Chunks``
# one binary frame as several messages.
_Message: TypeAlias = "bytes | list[bytes | memoryview]"


@dataclass(eq=False)
class _Connection:
    """One open WebSocket and the runs transmitted on it."""

    ws: Any
    #: builds one complete data frame (``first_byte``, payload): the client's own masked
    #: frames, or ``websockets``' when an extension (permessage-deflate) is on
    frame: Callable[[int, bytes], bytes]
    sent: set[str] = field(default_factory=set)
    closed: bool = False
    reader: asyncio.Task[None] | None = None
    #: frames queued in this loop tick, written together by ``_flush`` (run_id or None)
    outbox: list[tuple[str | None, _Message]] = field(default_factory=list)
    #: the worker announced binary frames and ``binary_frames`` is on
    binary: bool = False
    #: the worker takes a JSON list of commands in one text message (``command_lists``)
    lists: bool = False
    #: binary frames are on and the worker assembles chunked ones (``binary_chunks``)
    chunks: bool = False
    #: assembles the worker's chunked binary frames
    assembler: ChunkAssembler | None = None
    #: writing a chunked command, a chunk per drain (later messages wait in ``outbox``)
    writer: asyncio.Task[None] | None = None
    flush_scheduled: bool = False


@dataclass(eq=False)
class _Waiting:
    """A run waiting for the connection (never sent, or re-delivered after a loss)."""

    frame: dict[str, Any]
    data: _Message | None
    timer: asyncio.TimerHandle | None = None


class WebSocketEnvironmentExecutor(FrameExecutor):
    """Runs tasks on a WebSocket worker service (``wove worker websocket``).

    ``executor_config`` keys: :data:`WEBSOCKET_OPTIONS` (``url``, ``ws://`` or ``wss://``,
    required; ``security``, ``headers``, ``open_timeout``, ``ping_interval``,
    ``ping_timeout``, ``close_timeout``, ``max_size``, ``compression``, ``insecure``), the
    TLS keys of :data:`wove.tls.TLS_OPTIONS` (``ca_file``, ``cert_file``, ``key_file``,
    ``verify``, ``server_hostname``, ``tls``; older spellings ``certfile``, ``keyfile``,
    ``ssl``), the re-delivery keys and the payload keys of
    :data:`wove.options.PAYLOAD_OPTIONS` (``binary_frames``, ``max_message_bytes``: the
    largest command sent, ``payload_warning_bytes``). An unknown key is a
    :class:`~wove.errors.ConfigError` at start, with a did-you-mean. Failures are
    described by one table, :data:`FAILURES`.
    """

    executor_name = "websocket"
    config_options = WEBSOCKET_OPTIONS

    def __init__(self) -> None:
        super().__init__()
        self._url = ""
        self._target = "/"
        self._headers: dict[str, str] = {}
        self._security = NetworkExecutorSecurity()
        self._connect: Callable[..., Any] | None = None
        self._connection_class: Any = None
        self._connect_kwargs: dict[str, Any] = {}
        self._closed_errors: tuple[type[BaseException], ...] = ()
        #: the client's own frame writer (built in start(), once websockets is imported)
        self._own_frame: Callable[[int, bytes], bytes] | None = None
        self._open_state: Any = None
        self._conn: _Connection | None = None
        self._waiting: dict[str, _Waiting] = {}
        self._reconnector: asyncio.Task[None] | None = None
        self._stopping = False
        self._last_error = ""
        #: binary_frames is on (the worker must announce them too, per connection)
        self._binary_wanted = True
        self._options: dict[str, float | None] = {
            option.name: option.default for option in WEBSOCKET_OPTIONS if option.name in _OFF_KEYS[:4]}

    # -- lifecycle -------------------------------------------------------------
    async def start(
        self,
        *,
        environment_name: str,
        environment_config: dict[str, Any],
        run_config: dict[str, Any],
    ) -> None:
        """Validate the config and open the connection.

        Raises:
            ImportError: ``websockets`` is not installed.
            ConfigError: an unknown key (with a did-you-mean), a bad value or TLS keys
                that contradict each other (the message names the key and the fix); a
                non-local target without TLS or security.
            RuntimeError: a security environment variable is unset.
            ConnectionError: the first connection could not be made (names the URL and
                the reason, for example the handshake's HTTP 401/403).
        """
        del run_config
        try:
            import websockets.exceptions
            import websockets.protocol
            from websockets.asyncio.client import ClientConnection, connect
            from websockets.frames import apply_mask
        except ImportError as exc:  # pragma: no cover - websockets is a dependency
            raise ImportError(
                "websocket executor needs websockets, which is not installed. "
                f"Install it with: {install_hint('wove-executor-ws')}"
            ) from exc
        where = f"Environment '{environment_name}'"
        config = WEBSOCKET_OPTIONS.validate(environment_config, environment=environment_name)
        for key in _OFF_KEYS:  # None (documented) or false: off
            if config[key] is False or (key in environment_config and environment_config[key] is None):
                config[key] = None
        url = config["url"]
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("ws", "wss") or not parsed.hostname:
            raise ConfigError(
                f"{where}: executor_config.url must be a ws:// or wss:// URL with a host, got {url!r} "
                "(for example ws://127.0.0.1:8765/wove)."
            )
        tls = tls_settings(config, executor="websocket", environment=environment_name,
                           url_tls=parsed.scheme == "wss")
        security = NetworkExecutorSecurity.from_config(config["security"]).resolve()
        ensure_secure_target(
            environment=environment_name, executor="websocket", target=url, local=is_local_url(url),
            tls=tls.enabled, security=security, insecure=config["insecure"],
        )
        headers = config["headers"] or {}
        for key in ("open_timeout", "ping_interval", "ping_timeout", "close_timeout"):
            self._options[key] = None if config[key] is None else float(config[key])
        max_size = config["max_size"]
        compression = config["compression"]
        self._binary_wanted = bool(config["binary_frames"])

        self._open_events(environment_name, environment_config)
        self._url = url
        self._target = canonical_http_target(url)
        self._headers = {str(k): str(v) for k, v in headers.items()}
        self._security = security
        self._connect = connect
        self._connection_class = _direct_connection(
            ClientConnection, own_frame_bytes=min(OWN_FRAME_BYTES, max_size or OWN_FRAME_BYTES))
        self._own_frame = _frame_writer(apply_mask)
        self._closed_errors = (websockets.exceptions.ConnectionClosed,)
        self._open_state = websockets.protocol.State.OPEN
        self._connect_kwargs = {
            "open_timeout": self._options["open_timeout"],
            "ping_interval": self._options["ping_interval"],
            "ping_timeout": self._options["ping_timeout"],
            "close_timeout": self._options["close_timeout"],
            "max_size": max_size,
            "compression": compression,
            # commands are written as they come; events are read by one task, so a
            # deeper queue absorbs bursts without pausing the socket
            "max_queue": 256,
        }
        if is_local_url(url) and "proxy" in inspect.signature(connect).parameters:
            # websockets >= 15 follows HTTP(S)_PROXY by default; loopback never goes through one
            self._connect_kwargs["proxy"] = None
        if tls.enabled:
            self._connect_kwargs["ssl"] = client_ssl_context(tls)
            if tls.server_hostname:
                self._connect_kwargs["server_hostname"] = tls.server_hostname
        self._stopping = False
        self._waiting = {}
        try:
            connection = await self._open()
        except Exception as exc:
            self._events = None
            raise ConnectionError(
                f"{where}: the websocket executor could not connect to {url}: {self._describe(exc).message}"
            ) from exc
        self._install(connection)

    async def stop(self) -> None:
        """Close the connection and forget waiting runs (the runtime settled them)."""
        self._stopping = True
        if self._reconnector is not None:
            self._reconnector.cancel()
            await asyncio.gather(self._reconnector, return_exceptions=True)
            self._reconnector = None
        for waiting in self._waiting.values():
            if waiting.timer is not None:
                waiting.timer.cancel()
        self._waiting.clear()
        connection, self._conn = self._conn, None
        if connection is not None:
            connection.closed = True
            try:
                await asyncio.wait_for(connection.ws.close(), (self._options["close_timeout"] or 2.0) + 1.0)
            except Exception as exc:  # closing a broken connection must not fail stop()
                logger.debug("websocket: closing %s failed: %r", self._url, exc)
            if connection.reader is not None:
                connection.reader.cancel()
                await asyncio.gather(connection.reader, return_exceptions=True)
        self._events = None

    # -- frames ----------------------------------------------------------------
    async def send(self, frame: dict[str, Any]) -> None:
        """Send one command; a run_task waits (bounded) for the connection when it is down.

        Raises:
            ValueError: unknown command type.
            DispatchError: the callable or an argument cannot be pickled.
            RuntimeError: the executor is not started.
        """
        self._require_started()
        frame_type = frame.get("type")
        if frame_type == "run_task":
            connection = self._conn
            data, size = self._encode(frame, connection)
            self._track(frame, size)
            if connection is None:
                self._wait_for_connection(frame, data)
            else:
                await self._transmit(connection, frame, data)
        elif frame_type == "cancel_task":
            run_id = str(frame.get("run_id"))
            waiting = self._waiting.pop(run_id, None)
            if waiting is not None:  # never reached the worker: nothing to stop there
                if waiting.timer is not None:
                    waiting.timer.cancel()
                self._emit({"type": "task_cancelled", "run_id": run_id, "task_id": frame.get("task_id", run_id)})
                return
            await self._send_control(frame)
        elif frame_type == "shutdown" or frame_type == "stream_credit":  # credit: only after task_yield was announced
            await self._send_control(frame)
        else:
            raise ValueError(
                f"websocket executor for environment '{self._environment}' cannot send a frame of type "
                f"{frame_type!r}; expected run_task, cancel_task or shutdown."
            )

    def _encode(self, frame: dict[str, Any], connection: _Connection | None) -> tuple[_Message, int]:
        """Encode a run_task for ``connection`` (None: the next one) and check its size.

        JSON unless the worker speaks binary frames and the command carries bulky data
        (:func:`wove.framing.worth_binary`): small commands are cheaper as JSON.

        Raises:
            PayloadTooLargeError: over ``max_message_bytes``.
            DispatchError: the callable or an argument cannot be pickled.
        """
        binary = connection.binary if connection is not None else self._binary_wanted and \
            CAPABILITY_BINARY_FRAMES in self.capabilities
        if binary and worth_binary(frame):
            parts = encode_binary_parts(frame)
            size = sum(map(len, parts))
            self._check_payload(frame, size)
            if size > CHUNK_BYTES and (connection.chunks if connection is not None
                                       else CAPABILITY_BINARY_CHUNKS in self.capabilities):
                return _Chunks(chunks(parts, CHUNK_BYTES)), size
            return (fragments(parts) if size >= FRAGMENT_BYTES else b"".join(parts)), size
        data = encode_frame(frame)
        self._check_payload(frame, len(data))
        return data, len(data)

    def _check_received(self, size: int) -> None:
        """A chunked event from the worker must fit ``max_size``, as one message must."""
        limit = self._connect_kwargs.get("max_size")
        if limit and size > limit:
            raise ProtocolError(f"A chunked frame of {size} bytes from the worker exceeds this client's "
                                f"max_size={limit}; raise executor_config.max_size to accept it")

    async def _send_control(self, frame: dict[str, Any]) -> None:
        connection = self._conn
        if connection is None or connection.closed:
            return  # the runs it concerns were settled when the connection was lost
        self._queue(connection, None, encode_frame(frame))

    async def _transmit(self, connection: _Connection, frame: dict[str, Any], data: _Message) -> None:
        if connection.closed:
            self._wait_for_connection(frame, data)
            return
        self._queue(connection, frame["run_id"], data)
        ws = connection.ws
        if getattr(ws, "paused", False):  # the socket's write buffer is full: push back
            try:
                await ws.drain()
            except Exception as exc:  # the reader handles the loss
                logger.debug("websocket: drain on %s failed: %r", self._url, exc)

    def _queue(self, connection: _Connection, run_id: str | None, data: _Message) -> None:
        """Queue one message; every message queued in this loop tick is written at once.

        To a worker that announced ``command_lists``, the small JSON commands queued
        together go as one text message, a JSON list (at most :data:`LIST_COMMANDS`
        commands and :data:`LIST_BYTES` bytes each; one over :data:`LIST_ITEM_BYTES` goes
        alone); to any other (Wove 2.x), each command is its own
        message and batching only saves the per-message write path and system call. The
        frames go out in one ``transport.write``; a batch holding a fragmented binary
        message writes its frames one by one, unjoined.
        """
        connection.outbox.append((run_id, data))
        if run_id is not None:
            connection.sent.add(run_id)
        if not connection.flush_scheduled:
            connection.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush, connection)

    def _flush(self, connection: _Connection) -> None:
        connection.flush_scheduled = False
        if connection.closed or not connection.outbox or connection.writer is not None:
            return  # (a chunked command is being written: its writer flushes the rest)
        ws = connection.ws
        protocol = ws.protocol
        if protocol.state is not self._open_state:
            return  # closing: the reader reports the loss and re-queues the outbox
        batch, connection.outbox = connection.outbox, []
        frame = connection.frame
        try:
            large = False
            out = protocol.data_to_send()  # frames websockets has queued go first
            texts: list[bytes] = []  # JSON commands waiting to go as one list message
            size = 0
            lists = connection.lists
            for index, (_run_id, data) in enumerate(batch):
                if type(data) is _Chunks:  # written a chunk at a time, the rest after it
                    connection.outbox = batch[index:] + connection.outbox
                    connection.writer = asyncio.get_running_loop().create_task(
                        self._write_chunks(connection), name=f"wove-websocket-chunks:{self._environment}")
                    break
                if type(data) is bytes and data[0]:  # JSON starts with "{"; a binary frame with a NUL
                    if not lists or len(data) > LIST_ITEM_BYTES:
                        out.append(frame(_TEXT_FIN, data))
                        continue
                    if texts and (len(texts) >= LIST_COMMANDS or size + len(data) > LIST_BYTES):
                        out.append(frame(_TEXT_FIN, _as_list(texts)))
                        texts, size = [], 0
                    texts.append(data)
                    size += len(data) + 1
                    continue
                if texts:  # keep the order: the commands queued before this binary message go first
                    out.append(frame(_TEXT_FIN, _as_list(texts)))
                    texts, size = [], 0
                if type(data) is bytes:
                    out.append(frame(_BINARY_FIN, data))
                else:  # a large binary message: one WebSocket fragment per large buffer
                    large = True
                    last = len(data) - 1
                    protocol.send_binary(data[0], fin=last == 0)
                    for index in range(1, last + 1):
                        protocol.send_continuation(data[index], fin=index == last)
                    out.extend(protocol.data_to_send())
            if texts:
                out.append(frame(_TEXT_FIN, _as_list(texts)))
            pieces = [piece for piece in out if piece]
            if large:  # no join: asyncio sends or buffers each piece (3.12+: without a copy)
                for piece in pieces:
                    ws.transport.write(piece)
            elif pieces:
                ws.transport.write(pieces[0] if len(pieces) == 1 else b"".join(pieces))
        except Exception as exc:
            logger.warning("websocket: writing to %s failed: %r", self._url, exc)
            ws.transport.abort()  # the reader sees the loss; these runs may not have gone out

    async def _write_chunks(self, connection: _Connection) -> None:
        """Write the chunked command at the head of the outbox, one chunk per drain of the
        socket (the command is never held again in the socket's buffer), then flush what
        queued meanwhile."""
        ws = connection.ws
        protocol = ws.protocol
        try:
            _run_id, data = connection.outbox.pop(0)
            assert isinstance(data, _Chunks)
            while data:
                if connection.closed or protocol.state is not self._open_state:
                    return  # the reader reports the loss and re-queues the runs
                protocol.send_binary(data.pop(0))
                for piece in protocol.data_to_send():
                    if piece:
                        ws.transport.write(piece)
                if ws.paused:
                    await ws.drain()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.warning("websocket: writing to %s failed: %r", self._url, exc)
            ws.transport.abort()
        finally:
            connection.writer = None
            if connection.outbox and not connection.closed:
                self._flush(connection)

    def _wait_for_connection(self, frame: dict[str, Any], data: _Message | None) -> None:
        run_id = str(frame["run_id"])
        timeout = self._redelivery.reconnect_timeout  # the policy every transport shares
        waiting = _Waiting(frame, data)
        waiting.timer = asyncio.get_running_loop().call_later(timeout, self._give_up, run_id)
        self._waiting[run_id] = waiting
        if self._conn is None:
            self._ensure_reconnecting()

    def _give_up(self, run_id: str) -> None:
        waiting = self._waiting.pop(run_id, None)
        if waiting is None:
            return
        last = f" Last attempt: {self._last_error}." if self._last_error else ""
        self._emit(transport_error_event(
            waiting.frame,
            f"Run {run_id} was not delivered: the WebSocket connection to {self._url} is down and could not be "
            f"re-established within reconnect_timeout={self._redelivery.reconnect_timeout:g}s.{last} "
            "Check that the worker service is running (wove worker websocket) and reachable.",
        ))

    # -- connection ------------------------------------------------------------
    async def _open(self) -> _Connection:
        assert self._connect is not None
        headers = dict(self._headers)
        if self._binary_wanted and not any(key.lower() == CAPABILITIES_HEADER.lower() for key in headers):
            # lets our worker answer in binary frames (a large one in chunks) from the first
            # event (a Wove 2.x worker ignores it)
            headers[CAPABILITIES_HEADER] = f"{CAPABILITY_BINARY_FRAMES}, {CAPABILITY_BINARY_CHUNKS}"
        headers.update(self._security.headers_for(transport="websocket", target=self._target, body=b""))
        ws = await self._connect(self._url, additional_headers=headers or None,
                                 create_connection=self._connection_class, **self._connect_kwargs)
        assert self._own_frame is not None  # start() built it
        protocol = ws.protocol
        return _Connection(ws, self._own_frame if not protocol.extensions else _library_frame(protocol))

    def _install(self, connection: _Connection) -> None:
        self._conn = connection
        # the handshake answer's X-Wove-Capabilities (a Wove 2.x worker sends none)
        response = getattr(connection.ws, "response", None)
        header = response.headers.get(CAPABILITIES_HEADER, "") if response is not None else ""
        self.capabilities = capability_names(header)
        connection.binary = self._binary_wanted and CAPABILITY_BINARY_FRAMES in self.capabilities
        connection.lists = CAPABILITY_COMMAND_LISTS in self.capabilities
        connection.chunks = connection.binary and CAPABILITY_BINARY_CHUNKS in self.capabilities
        connection.assembler = ChunkAssembler(self._check_received, by_segment=True)
        # messages reach _received as they are parsed (no recv() per message)
        connection.ws.on_message = functools.partial(self._received, connection)
        self._last_error = ""
        connection.reader = asyncio.get_running_loop().create_task(
            self._read(connection), name=f"wove-websocket-reader:{self._environment}"
        )

    async def _read(self, connection: _Connection) -> None:
        """Until the connection ends (its messages reach :meth:`_received` as they are
        parsed, see :meth:`_install`); then the loss is handled."""
        ws = connection.ws
        error: BaseException | None = None
        try:
            await ws.wait_closed()
            error = ws.protocol.close_exc
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = exc
            logger.warning("websocket: reading from %s failed: %r", self._url, exc)
        self._connection_lost(connection, error)

    def _received(self, connection: _Connection, data: bytes | bytearray | memoryview) -> None:
        """One message from the worker: its events go to the runtime (never raises: a
        message that does not decode is logged and dropped, the connection stays up; a
        chunked frame waits for its last chunk)."""
        assembler = connection.assembler
        if assembler is not None and (assembler.pending or data[:1] == b"\x00"):
            try:
                whole = assembler.feed(data)
            except ProtocolError as exc:  # its runs cannot be answered: end the connection
                logger.warning("websocket: dropping the connection to %s: %s", self._url, exc)
                connection.ws.transport.abort()
                return
            if whole is None:
                return
            received: bytes | bytearray | memoryview | SplitFrame = whole
        else:
            received = data
        try:
            events = decode_events(received)
        except ProtocolError as exc:
            logger.warning("websocket: ignoring a malformed message from %s: %s", self._url, exc)
            return
        self._warn_received(events, len(received))
        sent = connection.sent
        emit = self._emit
        for event in events:
            if event.get("type") in TERMINAL_EVENTS:
                sent.discard(event.get("run_id"))  # type: ignore[arg-type]
            emit(event)

    def _connection_lost(self, connection: _Connection, error: BaseException | None) -> None:
        if connection.closed or self._stopping:
            return
        failure = self._describe(error) if error is not None else TransportFailure(
            "ConnectionLost", f"the connection to {self._url} ended. {_LOST_HINT}")
        reason = failure.message
        connection.closed = True
        if self._conn is connection:
            self._conn = None
        logger.warning("websocket: connection to %s lost (%s); %d run(s) in flight",
                       self._url, reason, len(connection.sent))
        unsent, connection.outbox = connection.outbox, []
        for run_id, data in unsent:  # never written: deliver on the next connection
            if run_id is None:
                continue
            connection.sent.discard(run_id)
            entry = self._inflight.get(run_id)
            if entry is not None:
                self._wait_for_connection(entry.frame, data)
        for run_id in list(connection.sent):
            entry = self._inflight.get(run_id)
            if entry is None:
                continue
            message = (
                f"Run {run_id} had not finished (delivery_orphan_policy='{entry.policy}') when {reason} "
                "The run may or may not have executed on the worker."
            )
            if self._lost(run_id, message, error, kind=failure.kind):
                self._track(entry.frame)
                self._wait_for_connection(entry.frame, None)
        connection.sent.clear()
        self._ensure_reconnecting()

    def _ensure_reconnecting(self) -> None:
        if self._stopping or self._events is None:
            return
        if self._reconnector is None or self._reconnector.done():
            self._reconnector = asyncio.get_running_loop().create_task(
                self._reconnect(), name=f"wove-websocket-reconnect:{self._environment}"
            )

    async def _reconnect(self) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        give_up_after = self._redelivery.reconnect_timeout  # back-off and timeout: wove.transport's policy
        attempt = 0
        while not self._stopping:
            attempt += 1
            try:
                connection = await self._open()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._last_error = self._describe(exc).message
                logger.info("websocket: reconnect attempt %d to %s failed: %s", attempt, self._url, self._last_error)
                if not self._waiting and loop.time() - started >= give_up_after:
                    return  # idle: the next run_task starts a new round
                await asyncio.sleep(self._redelivery.delay(attempt))
                continue
            if self._stopping:
                await connection.ws.close()
                return
            logger.info("websocket: reconnected to %s after %d attempt(s)", self._url, attempt)
            self._install(connection)
            await self._flush_waiting(connection)
            return

    async def _flush_waiting(self, connection: _Connection) -> None:
        while self._waiting and not connection.closed:
            run_id = next(iter(self._waiting))
            waiting = self._waiting.pop(run_id)
            if waiting.timer is not None:
                waiting.timer.cancel()
            data = waiting.data
            if data is None or (not connection.binary and (type(data) is not bytes or not data[0])) or (
                    type(data) is _Chunks and not connection.chunks):
                # never encoded, or binary (chunked) for a worker that no longer reads it: encode for this one
                try:
                    data = self._encode(waiting.frame, connection)[0]
                except Exception as exc:  # over the limit as JSON: fail this run, not the connection
                    self._emit(transport_error_event(waiting.frame, str(exc), exc, retryable=False))
                    continue
            self._queue(connection, waiting.frame["run_id"], data)

    def _describe(self, exc: BaseException) -> TransportFailure:
        return describe_failure(exc, self._url, open_timeout=self._options.get("open_timeout"))


class TransportFailure(NamedTuple):
    """A failed connection or a lost one, described: see :func:`describe_failure`.

    Attributes:
        kind: short name (the ``kind`` of the ``task_error``), e.g. ``ConnectionRefused``.
        message: what happened, naming the URL, the cause and the fix.
    """

    kind: str
    message: str


class FailureRule(NamedTuple):
    """One row of :data:`FAILURES`. A row matches an exception in the failure's chain by
    type (``types``), by the HTTP status of a rejected handshake (``status``), or by the
    close code of a closed connection (``close_code``), and only for ``wss://`` URLs when
    ``tls`` is True (``ws://`` when False); ``label`` and ``hint`` are formatted with
    ``url``, ``port``, ``status``, ``code`` and ``open_timeout``."""

    kind: str
    label: str
    hint: str
    types: tuple[type[BaseException], ...] = ()
    status: int | None = None
    close_code: int | None = None
    tls: bool | None = None


_LOST_HINT = ("The worker may have crashed, restarted or been cut off; use delivery_orphan_policy='requeue' to "
              "deliver such runs again automatically.")
_TLS_KEYS = "executor_config.ca_file, cert_file, key_file, verify and server_hostname"

#: The one table of websocket failures, most specific first (in the style of httpx's
#: ``map_httpcore_exceptions``): rejected handshakes by HTTP status, closed connections
#: by close code, then exception types. The first matching row describes the failure;
#: rows for ``websockets`` types are added when an executor first describes one (the
#: library is imported lazily).
FAILURES: list[FailureRule] = [
    FailureRule("Unauthorized", "the server rejected the WebSocket handshake with HTTP 401",
                "Configure executor_config.security to match the worker's --security.", status=401),
    FailureRule("Forbidden", "the server rejected the WebSocket handshake with HTTP 403",
                "Check that executor_config.security uses the worker's secret and that the clocks agree.",
                status=403),
    FailureRule("NotFound", "the server rejected the WebSocket handshake with HTTP 404",
                "Check the URL path (the worker serves --path, default /wove).", status=404),
    FailureRule("MessageTooBig", "the connection to {url} was closed with code 1009: a message was too big",
                "Send smaller arguments or results, or raise the worker's --max-body-bytes and "
                "executor_config.max_size.", close_code=1009),
    FailureRule("WorkerGoingAway", "the worker at {url} closed the connection with code 1001 (going away)",
                "The worker is shutting down or restarting; runs with delivery_orphan_policy='requeue' are "
                "delivered again once it is back.", close_code=1001),
    FailureRule("PolicyViolation", "the worker at {url} closed the connection with code 1008 (policy violation)",
                "The worker refused a message from this client; its log says why.", close_code=1008),
    FailureRule("WorkerError", "the connection to {url} was closed with code 1011 (internal error)",
                "The worker failed, or a keepalive ping went unanswered within executor_config.ping_timeout. "
                + _LOST_HINT, close_code=1011),
    FailureRule("TLSVerifyFailed", "TLS certificate verify failed for {url}",
                "The worker's certificate is not trusted here: set executor_config.ca_file to the CA bundle "
                "(PEM) that signed it (and executor_config.server_hostname when the certificate names another "
                "host); executor_config.verify=false only for development.",
                types=(ssl.SSLCertVerificationError,)),
    FailureRule("TLSError", "TLS handshake with {url} failed",
                "Check that the worker serves wss:// (wove worker websocket --certfile/--keyfile) on that port "
                f"(a plaintext worker needs a ws:// URL), and {_TLS_KEYS}.", types=(ssl.SSLError,)),
    FailureRule("TLSHandshakeClosed", "the worker at {url} closed the connection during the TLS handshake",
                "A plaintext worker (started without --certfile) needs a ws:// URL; otherwise check "
                f"{_TLS_KEYS}.", types=(ConnectionResetError, ConnectionAbortedError, BrokenPipeError), tls=True),
    FailureRule("ConnectionRefused", "connection refused at {url}",
                "Is the worker service running? Start it with `wove worker websocket --port {port}`, or fix "
                "executor_config.url.", types=(ConnectionRefusedError,)),
    FailureRule("HostNotFound", "could not resolve the host of {url}", "Check the host name in executor_config.url.",
                types=(socket.gaierror,)),
    FailureRule("Timeout", "no WebSocket handshake with {url} within open_timeout={open_timeout}s",
                "Is the worker reachable from here (host, port, firewall)? Raise executor_config.open_timeout on a "
                "slow network.", types=(TimeoutError, asyncio.TimeoutError)),
]
_table_ready = False


def _complete_table() -> None:
    """Add the rows for ``websockets`` types to :data:`FAILURES` (once)."""
    global _table_ready
    if _table_ready:
        return
    from websockets.exceptions import ConnectionClosed, InvalidMessage, InvalidStatus

    def after(last: Callable[[FailureRule], bool]) -> int:
        return max(index for index, rule in enumerate(FAILURES) if last(rule)) + 1

    # a closed connection is described as such, whatever low-level error closed it
    FAILURES.insert(after(lambda rule: rule.close_code is not None),
                    FailureRule("ConnectionLost", "the connection to {url} was lost", _LOST_HINT,
                                types=(ConnectionClosed,)))
    FAILURES.insert(after(lambda rule: rule.status is not None),
                    FailureRule("HandshakeRejected", "the server rejected the WebSocket handshake with HTTP {status}",
                                "Check executor_config.url and the worker's log.", types=(InvalidStatus,)))
    FAILURES.extend([
        FailureRule("InvalidHandshake", "{url} did not answer the WebSocket handshake",
                    "If the worker serves TLS (--certfile), use a wss:// URL; check that `wove worker websocket` "
                    "listens there.", types=(InvalidMessage,)),
        FailureRule("ConnectError", "could not connect to {url}",
                    "Is the worker service running and reachable? Check executor_config.url.", types=(OSError,)),
    ])
    _table_ready = True


def _status(exc: BaseException) -> int | None:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return status if isinstance(status, int) else None


def _close_code(exc: BaseException) -> int | None:
    if not hasattr(exc, "rcvd") or not hasattr(exc, "sent"):
        return None
    frame = exc.rcvd or exc.sent
    return int(frame.code) if frame is not None else 1006


def _matches(rule: FailureRule, exc: BaseException) -> bool:
    if rule.status is not None:
        return _status(exc) == rule.status
    if rule.close_code is not None:
        return _close_code(exc) == rule.close_code
    return isinstance(exc, rule.types)


def describe_failure(exc: BaseException, url: str, *, open_timeout: float | None = None) -> TransportFailure:
    """Describe a failed or lost connection to ``url`` with the :data:`FAILURES` table.

    The message reads ``<label>: <detail>. <hint>``, for example ``the server rejected the
    WebSocket handshake with HTTP 403: Invalid signature. Check that
    executor_config.security ...``.
    """
    _complete_table()
    chain = exception_chain(exc)
    tls = url.startswith("wss:")
    for rule in FAILURES:
        if rule.tls is not None and rule.tls != tls:
            continue
        match = next((item for item in reversed(chain) if _matches(rule, item)), None)
        if match is None:
            continue
        status = _status(match)
        values = {"url": url, "port": urllib.parse.urlsplit(url).port or "", "status": status,
                  "code": _close_code(match), "open_timeout": f"{open_timeout:g}" if open_timeout else "none"}
        if status is not None:
            body = getattr(match.response, "body", b"") or b""  # type: ignore[attr-defined]
            detail = body.decode("utf-8", "replace").strip()[:300] or f"HTTP {status}"
        else:
            detail = getattr(match, "verify_message", None) or str(match) or type(match).__name__
        return TransportFailure(rule.kind, f"{rule.label.format(**values)}: {detail.rstrip('.')}. "
                                           f"{rule.hint.format(**values)}")
    root = chain[-1]
    return TransportFailure(type(root).__name__, f"the connection to {url} failed: {type(root).__name__}: {root}.")


#: the largest data frame the client's own parser hands over (larger ones, and every
#: control or fragmented frame, go through ``websockets``, which enforces ``max_size``)
OWN_FRAME_BYTES = 64 * 1024
_TEXT_FIN, _BINARY_FIN = 0x81, 0x82


#: masks drawn from ``os.urandom`` at once by a frame writer (one system call per 1,024 frames)
_MASK_POOL_BYTES = 4096


def _frame_writer(apply_mask: Callable[[bytes, bytes], bytes]) -> Callable[[int, bytes], bytes]:
    """What writes one complete client data frame (RFC 6455 5.2): ``first_byte`` is FIN
    and the opcode (0x81 text, 0x82 binary); the mask is 4 fresh bytes of ``os.urandom``
    (drawn :data:`_MASK_POOL_BYTES` at a time, each used once); ``apply_mask`` is
    ``websockets``' (its C speedup when built)."""
    urandom = os.urandom
    pool, at = b"", _MASK_POOL_BYTES

    def frame(first_byte: int, payload: bytes) -> bytes:
        nonlocal pool, at
        if at == _MASK_POOL_BYTES:
            pool, at = urandom(_MASK_POOL_BYTES), 0
        mask = pool[at:at + 4]
        at += 4
        size = len(payload)
        if size < 126:
            head = bytes((first_byte, 0x80 | size))
        elif size < 65536:
            head = bytes((first_byte, 0xFE)) + size.to_bytes(2, "big")
        else:
            head = bytes((first_byte, 0xFF)) + size.to_bytes(8, "big")
        return head + mask + apply_mask(payload, mask)

    return frame


def _library_frame(protocol: Any) -> Callable[[int, bytes], bytes]:
    """Frames written by ``websockets`` (for a connection with an extension: compressed)."""

    def frame(first_byte: int, payload: bytes) -> bytes:
        if first_byte == _TEXT_FIN:
            protocol.send_text(payload)
        else:
            protocol.send_binary(payload)
        return b"".join(protocol.data_to_send())

    return frame


def _direct_connection(base: type, *, own_frame_bytes: int = OWN_FRAME_BYTES) -> Any:
    """A ``websockets`` client connection that hands each complete data message to its
    ``on_message`` callback as it arrives, instead of queueing it for ``recv()``.

    After the handshake (which ``websockets`` reads: the connection feeds it exactly the
    bytes of the ``101`` response head) the connection splits the byte stream into frames
    itself: an unfragmented, uncompressed text or binary frame of at most
    ``own_frame_bytes`` goes to ``on_message`` from the received bytes (the client's CPU
    per no-op run is a performance goal: ``websockets``' parser costs more than the rest
    of receiving an event). Every other frame (control frames, fragments, compressed or
    larger ones, anything after a close frame) is passed to ``websockets`` whole and at
    a frame boundary, so its parser, limits, keepalive and closing handshake work as
    always, and its fragmented messages are joined here before ``on_message``."""
    from websockets.frames import Frame, Opcode
    from websockets.protocol import State

    data_opcodes = (Opcode.TEXT, Opcode.BINARY)
    continuation = Opcode.CONT
    open_state, connecting = State.OPEN, State.CONNECTING

    class DirectConnection(base):  # type: ignore[misc, valid-type]
        on_message: Callable[[bytes | bytearray | memoryview], None] | None = None
        _fragments: list[bytes | bytearray | memoryview] | None = None
        #: the handshake response received so far (None: websockets reads everything)
        _head: bytes | None = b""
        #: frames are split here (from the first byte after the 101 response head)
        _own = False
        #: the start of a frame that has not arrived in full
        _partial = b""
        #: bytes of the current frame still to pass to websockets
        _through = 0

        def data_received(self, data: bytes) -> None:
            if self._own:
                self._split(data)
                return
            head = self._head
            if head is None or self.protocol.state is not connecting:
                super().data_received(data)
                return
            seen = head + data
            end = seen.find(b"\r\n\r\n")
            if end < 0:
                self._head = seen if len(seen) <= 65536 else None
                super().data_received(data)
                return
            self._head = None
            cut = end + 4 - len(head)
            super().data_received(data[:cut])
            if seen.startswith(b"HTTP/1.1 101 ") and self.protocol.state is open_state:
                self._own = True
                if cut < len(data):
                    self._split(data[cut:])
            elif cut < len(data):
                super().data_received(data[cut:])

        def _split(self, data: bytes) -> None:
            if self._partial:
                data = self._partial + data
                self._partial = b""
            size = len(data)
            position = 0
            while position < size:
                through = self._through
                if through:  # the rest of a frame websockets reads
                    end = min(size, position + through)
                    self._through = through - (end - position)
                    super().data_received(data[position:end] if position or end < size else data)
                    position = end
                    continue
                if size - position < 2:
                    break
                first, second = data[position], data[position + 1]
                length = second & 0x7F
                head = 2
                if length == 126:
                    if size - position < 4:
                        break
                    length = int.from_bytes(data[position + 2:position + 4], "big")
                    head = 4
                elif length == 127:
                    if size - position < 10:
                        break
                    length = int.from_bytes(data[position + 2:position + 10], "big")
                    head = 10
                sink = self.on_message
                if (first in (_TEXT_FIN, _BINARY_FIN) and second < 0x80 and length <= own_frame_bytes
                        and sink is not None and self._fragments is None and self.protocol.state is open_state):
                    end = position + head + length
                    if end > size:
                        break
                    sink(data[position + head:end])
                    position = end
                else:  # websockets reads this frame (a masked one, a protocol error, included)
                    self._through = head + (4 if second & 0x80 else 0) + length
            if position < size:
                self._partial = data[position:]

        def process_event(self, event: Any) -> None:
            sink = self.on_message
            if sink is None or type(event) is not Frame:
                super().process_event(event)
                return
            opcode = event.opcode
            if opcode in data_opcodes:
                if event.fin:
                    sink(event.data)
                else:
                    self._fragments = [event.data]
            elif opcode is continuation and self._fragments is not None:
                self._fragments.append(event.data)
                if event.fin:
                    parts, self._fragments = self._fragments, None
                    sink(b"".join(parts))
            else:
                super().process_event(event)

    return DirectConnection
