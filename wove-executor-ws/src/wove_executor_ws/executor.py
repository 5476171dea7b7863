"""The ``websocket`` executor: every run of an environment over one WebSocket connection.

Commands go out as text messages (one JSON frame each); the worker service answers on
the same connection with events as they happen (one event, a list, or
``{"events": [...]}`` per message). When the connection drops the executor reconnects
with exponential backoff and jitter; runs in flight are delivered again when their
orphan policy is ``requeue`` (the worker deduplicates by ``run_id``) and otherwise end
with a ``task_error`` (source ``transport``) naming the URL. ``websockets`` is imported
in :meth:`WebSocketEnvironmentExecutor.start`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import ssl as ssl_module
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from wove.errors import ProtocolError
from wove.protocol import TERMINAL_EVENTS, decode_events, encode_frame, transport_error_event
from wove.security import (
    NetworkExecutorSecurity,
    canonical_http_target,
    ensure_secure_target,
    is_local_url,
)
from wove.transport import REDELIVERY_CONFIG_KEYS, FrameExecutor

__all__ = ["DEFAULT_MAX_SIZE", "WebSocketEnvironmentExecutor"]

logger = logging.getLogger(__name__)

#: Largest message accepted in either direction (a 20 MiB argument or result fits easily;
#: the library's own default of 1 MiB would drop the connection on a 1 MiB result).
DEFAULT_MAX_SIZE = 256 * 1024 * 1024

_FLOAT_DEFAULTS: dict[str, float | None] = {
    "open_timeout": 10.0,
    "ping_interval": 20.0,
    "ping_timeout": 20.0,
    "close_timeout": 2.0,
}
_CONFIG_KEYS = frozenset({
    "url", "security", "headers", "max_size", "compression", "ssl", "verify", "ca_file", "certfile",
    "keyfile", "insecure", "max_workers", *_FLOAT_DEFAULTS, *REDELIVERY_CONFIG_KEYS,
})


@dataclass(eq=False)
class _Connection:
    """One open WebSocket and the runs transmitted on it."""

    ws: Any
    sent: set[str] = field(default_factory=set)
    closed: bool = False
    reader: asyncio.Task[None] | None = None
    #: frames queued in this loop tick, written together by ``_flush`` (run_id or None)
    outbox: list[tuple[str | None, bytes]] = field(default_factory=list)
    flush_scheduled: bool = False


@dataclass(eq=False)
class _Waiting:
    """A run waiting for the connection (never sent, or re-delivered after a loss)."""

    frame: dict[str, Any]
    data: bytes | None
    timer: asyncio.TimerHandle | None = None


class WebSocketEnvironmentExecutor(FrameExecutor):
    """Runs tasks on a WebSocket worker service (``wove worker websocket``).

    ``executor_config`` keys (see the README for the full list): ``url`` (``ws://`` or
    ``wss://``, required), ``security``, ``headers``, ``open_timeout``,
    ``ping_interval``, ``ping_timeout``, ``max_size``, TLS (``ssl``, ``verify``,
    ``ca_file``, ``certfile``, ``keyfile``), ``insecure``, ``reconnect_initial_delay``,
    ``reconnect_max_delay``, ``reconnect_timeout`` and ``max_deliveries``.
    """

    executor_name = "websocket"

    def __init__(self) -> None:
        super().__init__()
        self._url = ""
        self._target = "/"
        self._headers: dict[str, str] = {}
        self._security = NetworkExecutorSecurity()
        self._connect: Callable[..., Any] | None = None
        self._connect_kwargs: dict[str, Any] = {}
        self._closed_errors: tuple[type[BaseException], ...] = ()
        self._open_state: Any = None
        self._conn: _Connection | None = None
        self._waiting: dict[str, _Waiting] = {}
        self._reconnector: asyncio.Task[None] | None = None
        self._stopping = False
        self._last_error = ""
        self._options: dict[str, float | None] = dict(_FLOAT_DEFAULTS)

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
            TypeError / ValueError: a config value is wrong (the message names the key).
            RuntimeError: a security environment variable is unset.
            ConnectionError: the first connection could not be made (names the URL and
                the reason, for example the handshake's HTTP 401/403).
        """
        del run_config
        try:
            import websockets.exceptions
            import websockets.protocol
            from websockets.asyncio.client import connect
        except ImportError as exc:  # pragma: no cover - websockets is a dependency
            raise ImportError(
                "websocket executor needs websockets, which is not installed. "
                "Install it with: pip install wove-executor-ws"
            ) from exc
        where = f"Environment '{environment_name}'"
        config = dict(environment_config)
        unknown = sorted(set(config) - _CONFIG_KEYS)
        if unknown:
            raise ValueError(
                f"{where}: unknown websocket executor_config key(s) {', '.join(unknown)}; "
                f"known keys: {', '.join(sorted(_CONFIG_KEYS - {'max_workers'}))}."
            )
        url = config.get("url")
        if not isinstance(url, str) or not url:
            raise TypeError(f"{where}: executor_config.url must be a ws:// or wss:// URL, got {url!r}.")
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("ws", "wss") or not parsed.hostname:
            raise ValueError(
                f"{where}: executor_config.url must be a ws:// or wss:// URL with a host, got {url!r} "
                "(for example ws://127.0.0.1:8765/wove)."
            )
        security = NetworkExecutorSecurity.from_config(config.get("security")).resolve()
        ensure_secure_target(
            environment=environment_name, executor="websocket", target=url, local=is_local_url(url),
            tls=parsed.scheme == "wss", security=security, insecure=bool(config.get("insecure", False)),
        )
        headers = config.get("headers") or {}
        if not isinstance(headers, dict):
            raise TypeError(f"{where}: executor_config.headers must be a dict of strings, got {type(headers).__name__}.")
        for key, default in _FLOAT_DEFAULTS.items():
            value = config.get(key, default)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0):
                raise ValueError(f"{where}: executor_config.{key} must be a non-negative number or None, got {value!r}.")
            self._options[key] = None if value is None else float(value)
        max_size = config.get("max_size", DEFAULT_MAX_SIZE)
        if max_size is not None and (not isinstance(max_size, int) or isinstance(max_size, bool) or max_size < 1):
            raise ValueError(f"{where}: executor_config.max_size must be a positive integer (bytes) or None, got {max_size!r}.")
        compression = config.get("compression")
        if compression not in (None, "deflate"):
            raise ValueError(f"{where}: executor_config.compression must be None or 'deflate', got {compression!r}.")

        self._open_events(environment_name, config)
        self._url = url
        self._target = canonical_http_target(url)
        self._headers = {str(k): str(v) for k, v in headers.items()}
        self._security = security
        self._connect = connect
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
        if parsed.scheme == "wss":
            self._connect_kwargs["ssl"] = _ssl_context(config, where)
        self._stopping = False
        self._waiting = {}
        try:
            connection = await self._open()
        except Exception as exc:
            self._events = None
            raise ConnectionError(
                f"{where}: the websocket executor could not connect to {url}: {self._describe(exc)}"
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
            data = encode_frame(frame)
            self._track(frame)
            connection = self._conn
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
        elif frame_type == "shutdown":
            await self._send_control(frame)
        else:
            raise ValueError(
                f"websocket executor for environment '{self._environment}' cannot send a frame of type "
                f"{frame_type!r}; expected run_task, cancel_task or shutdown."
            )

    async def _send_control(self, frame: dict[str, Any]) -> None:
        connection = self._conn
        if connection is None or connection.closed:
            return  # the runs it concerns were settled when the connection was lost
        self._queue(connection, None, encode_frame(frame))

    async def _transmit(self, connection: _Connection, frame: dict[str, Any], data: bytes) -> None:
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

    def _queue(self, connection: _Connection, run_id: str | None, data: bytes) -> None:
        """Queue one message; every message queued in this loop tick is written at once.

        Each command stays its own WebSocket message; batching only saves the per-message
        write path and system call (the frames go out in one ``transport.write``).
        """
        connection.outbox.append((run_id, data))
        if run_id is not None:
            connection.sent.add(run_id)
        if not connection.flush_scheduled:
            connection.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush, connection)

    def _flush(self, connection: _Connection) -> None:
        connection.flush_scheduled = False
        if connection.closed or not connection.outbox:
            return
        ws = connection.ws
        protocol = ws.protocol
        if protocol.state is not self._open_state:
            return  # closing: the reader reports the loss and re-queues the outbox
        batch, connection.outbox = connection.outbox, []
        try:
            for _run_id, data in batch:
                protocol.send_text(data)
            chunks = [chunk for chunk in protocol.data_to_send() if chunk]
            ws.transport.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        except Exception as exc:
            logger.warning("websocket: writing to %s failed: %r", self._url, exc)
            ws.transport.abort()  # the reader sees the loss; these runs may not have gone out

    def _wait_for_connection(self, frame: dict[str, Any], data: bytes | None) -> None:
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
        headers.update(self._security.headers_for(transport="websocket", target=self._target, body=b""))
        ws = await self._connect(self._url, additional_headers=headers or None, **self._connect_kwargs)
        return _Connection(ws)

    def _install(self, connection: _Connection) -> None:
        self._conn = connection
        self._last_error = ""
        connection.reader = asyncio.get_running_loop().create_task(
            self._read(connection), name=f"wove-websocket-reader:{self._environment}"
        )

    async def _read(self, connection: _Connection) -> None:
        reason = "the connection closed"
        error: BaseException | None = None
        recv = connection.ws.recv
        emit = self._emit
        sent = connection.sent
        try:
            while True:
                data = await recv(decode=False)
                try:
                    events = decode_events(data)
                except ProtocolError as exc:
                    logger.warning("websocket: ignoring a malformed message from %s: %s", self._url, exc)
                    continue
                for event in events:
                    if event.get("type") in TERMINAL_EVENTS:
                        sent.discard(event.get("run_id"))  # type: ignore[arg-type]
                    emit(event)
        except asyncio.CancelledError:
            raise
        except self._closed_errors as exc:
            reason, error = str(exc), exc
        except Exception as exc:
            reason, error = f"{type(exc).__name__}: {exc}", exc
            logger.warning("websocket: reading from %s failed: %s", self._url, reason)
            await asyncio.shield(connection.ws.close())
        self._connection_lost(connection, reason, error)

    def _connection_lost(self, connection: _Connection, reason: str, error: BaseException | None) -> None:
        if connection.closed or self._stopping:
            return
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
                f"The WebSocket connection to {self._url} was lost ({reason}) before run {run_id} finished "
                f"(delivery_orphan_policy='{entry.policy}'); the run may or may not have executed on the worker. "
                "Use delivery_orphan_policy='requeue' to deliver it again automatically."
            )
            if self._lost(run_id, message, error):
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
                self._last_error = self._describe(exc)
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
            data = waiting.data if waiting.data is not None else encode_frame(waiting.frame)
            self._queue(connection, waiting.frame["run_id"], data)

    def _describe(self, exc: BaseException) -> str:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status is not None:
            body = getattr(exc.response, "body", b"") or b""  # type: ignore[attr-defined]
            text = body.decode("utf-8", "replace").strip()[:300]
            hint = {
                401: " Configure executor_config.security to match the worker's --security.",
                403: " Check that executor_config.security uses the worker's secret and that the clocks agree.",
                404: " Check the URL path (the worker serves --path, default /wove).",
            }.get(status, "")
            return f"the server rejected the WebSocket handshake with HTTP {status}" + (f" ({text})" if text else "") + "." + hint
        if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
            return f"no WebSocket handshake within open_timeout={self._options['open_timeout']}s."
        return f"{type(exc).__name__}: {exc}"


def _ssl_context(config: dict[str, Any], where: str) -> ssl_module.SSLContext:
    """The client TLS context from ``ssl`` / ``verify`` / ``ca_file`` / ``certfile`` / ``keyfile``."""
    given = config.get("ssl")
    if isinstance(given, ssl_module.SSLContext):
        return given
    if given not in (None, True):
        raise TypeError(f"{where}: executor_config.ssl must be an ssl.SSLContext or True, got {given!r}.")
    context = ssl_module.create_default_context(cafile=config.get("ca_file"))
    if config.get("verify", True) is False:
        context.check_hostname = False
        context.verify_mode = ssl_module.CERT_NONE
    if config.get("certfile"):
        context.load_cert_chain(config["certfile"], config.get("keyfile"))
    return context
