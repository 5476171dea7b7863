"""The HTTP worker service: a raw ASGI application over :class:`wove.worker.WorkerEngine`.

``create_app()`` returns an ASGI 3 application (no framework) that serves one command per
``POST`` at its path (default ``/wove``), mountable under Starlette, FastAPI or any ASGI
router. ``wove worker http`` serves it with uvicorn (:func:`serve`).

Per request, in this order and before anything is unpickled:

1. with security on, the headers alone are checked (``401`` when credentials are missing,
   ``403`` for a wrong key id or token, or a bad, expired or future timestamp), before a
   byte of the body is read, and the connection is closed;
2. the body is read up to ``max_body_bytes`` (``413`` beyond, without reading the rest),
   within ``body_timeout`` seconds (``408`` after that: a slow or stalled sender);
3. the signature is verified on the raw bytes (``403`` when it is wrong or replayed);
4. the command is decoded (``400`` for a body that is not JSON or not a command; a
   ``run_task`` whose pickles fail answers ``200`` with that run's ``task_error``).

Connections: served by uvicorn (:func:`uvicorn_config`), a connection must send complete
request headers within ``header_timeout`` seconds of opening (or of the previous
response), and an idle keep-alive connection is closed after ``keepalive_timeout``.

A ``run_task`` answers with its events: NDJSON, one event per line as it happens
(``task_started``, heartbeats, the terminal event), when the ``Accept`` header names
``application/x-ndjson``; otherwise one JSON body ``{"events": [...]}`` ending with the
terminal event (what Wove 2.x clients read). ``cancel_task`` answers at once with
``{"events": []}``; the cancelled run's own response ends with ``task_cancelled``.
``GET <path>/health`` (and ``/healthz``) reports liveness.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from wove.errors import ProtocolError
from wove.protocol import TERMINAL_EVENTS, decode_command, encode_event, parse_json
from wove.security import MissingCredentialsError, NetworkExecutorSecurity
from wove.worker import WorkerEngine

__all__ = [
    "DEFAULT_BODY_TIMEOUT", "DEFAULT_HEADER_TIMEOUT", "DEFAULT_KEEPALIVE_TIMEOUT", "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_PATH", "WorkerApp", "create_app",
]

logger = logging.getLogger(__name__)

DEFAULT_PATH = "/wove"
DEFAULT_MAX_BODY_BYTES = 256 * 1024 * 1024
#: Seconds the whole request body may take to arrive after the headers.
DEFAULT_BODY_TIMEOUT = 60.0
#: Seconds a connection may take to send complete request headers.
DEFAULT_HEADER_TIMEOUT = 30.0
#: Seconds an idle keep-alive connection is kept open (longer than the executor's 30 s
#: ``keepalive_expiry``, so the client, not the server, closes idle connections).
DEFAULT_KEEPALIVE_TIMEOUT = 35.0
NDJSON = "application/x-ndjson"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_JSON_HEADERS = [(b"content-type", b"application/json")]
_NDJSON_HEADERS = [(b"content-type", NDJSON.encode()), (b"cache-control", b"no-store")]
_EMPTY_EVENTS = b'{"events":[]}'


class _Stream:
    """Events of one run on their way to one HTTP response."""

    __slots__ = ("closed", "disconnected", "events", "wake")

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.wake = asyncio.Event()
        self.closed = False
        self.disconnected = False

    def sink(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self.wake.set()


class WorkerApp:
    """ASGI application serving Wove command frames (see the module docstring).

    Args:
        security: ``NetworkExecutorSecurity``, ``"env:VAR"``, a security dict or None
            (no authentication: only for loopback development).
        engine: the worker engine to run commands on (default: a new one).
        max_concurrency: runs executing at once (for the default engine).
        max_body_bytes: largest accepted request body.
        path: URL path of the command endpoint (relative to the mount point).
        allow_remote_shutdown: obey ``shutdown`` commands (default False: a worker
            service is shared, so one client must not stop it; the command is ignored).
        shutdown_grace: seconds ``detach`` runs may take to finish on shutdown.
        body_timeout: seconds the request body may take to arrive once the headers are
            in (``408`` after that); None for no limit.
        header_timeout: seconds a connection may take to send complete request headers
            (applied by :func:`uvicorn_config`; a mounting server applies its own).
        keepalive_timeout: seconds an idle keep-alive connection stays open (likewise).

    Raises:
        ValueError / TypeError: invalid security configuration or limits.
        RuntimeError: a security environment variable is not set.
    """

    def __init__(
        self,
        *,
        security: Any = None,
        engine: WorkerEngine | None = None,
        max_concurrency: int = 256,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        path: str = DEFAULT_PATH,
        allow_remote_shutdown: bool = False,
        shutdown_grace: float = 10.0,
        body_timeout: float | None = DEFAULT_BODY_TIMEOUT,
        header_timeout: float = DEFAULT_HEADER_TIMEOUT,
        keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT,
    ) -> None:
        if not isinstance(max_body_bytes, int) or max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be a positive integer, got {max_body_bytes!r}.")
        for name, value in (("body_timeout", body_timeout), ("header_timeout", header_timeout),
                            ("keepalive_timeout", keepalive_timeout)):
            if value is None and name == "body_timeout":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}.")
        if not isinstance(path, str) or (path and not path.startswith("/")):
            raise ValueError(f"path must start with '/', got {path!r}.")
        self.security = NetworkExecutorSecurity.from_config(security).resolve()
        self.engine = engine or WorkerEngine(max_concurrency=max_concurrency, name="http")
        self.max_body_bytes = max_body_bytes
        self.path = path.rstrip("/")
        self.allow_remote_shutdown = allow_remote_shutdown
        self.shutdown_grace = shutdown_grace
        self.body_timeout = None if body_timeout is None else float(body_timeout)
        self.header_timeout = float(header_timeout)
        self.keepalive_timeout = float(keepalive_timeout)
        self._streams: set[_Stream] = set()
        self._shutdown: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------
    async def shutdown(self, policy: str | None = None) -> None:
        """Stop accepting runs and end running ones by their orphan policy.

        Open responses whose run ended without a terminal event (policy ``requeue``)
        are closed, so their clients re-deliver. Safe to call more than once.
        """
        if self._shutdown is None:
            self._shutdown = asyncio.ensure_future(self._do_shutdown(policy))
        await asyncio.shield(self._shutdown)

    async def _do_shutdown(self, policy: str | None) -> None:
        logger.info("http worker: shutting down (%d runs active)", self.engine.active)
        await self.engine.shutdown(policy, grace=self.shutdown_grace)
        for stream in list(self._streams):
            stream.closed = True
            stream.wake.set()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- ASGI ------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        if kind != "http":
            if kind == "websocket":
                await send({"type": "websocket.close", "code": 1003})
            return
        route = _route_path(scope)
        method = scope["method"]
        if route == self.path or route == self.path + "/":
            if method != "POST":
                await _respond(send, 405, {"error": f"Use POST to send commands to {self.path or '/'}; got {method}."},
                               extra=[(b"allow", b"POST")])
                return
            await self._command(scope, receive, send)
        elif route in (self.path + "/health", self.path + "/healthz", "/healthz"):
            if method not in ("GET", "HEAD"):
                await _respond(send, 405, {"error": f"Use GET for health checks; got {method}."},
                               extra=[(b"allow", b"GET, HEAD")])
                return
            status = "closing" if self.engine.closing else "ok"
            await _respond(send, 503 if self.engine.closing else 200,
                           {"status": status, "active": self.engine.active})
        else:
            await _respond(send, 404, {"error": f"No Wove endpoint at {route!r}; POST commands to {self.path or '/'}."})

    async def _command(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        secured = self.security.mode != "none"
        if secured:
            try:  # from the headers alone: an anonymous or forged body is never read
                self.security.precheck_headers(headers)
            except PermissionError as exc:
                await self._reject(scope, send, exc, before_body=True)
                return
        body = await self._read_body(headers, receive, send)
        if body is None:
            return
        if secured:
            try:
                self.security.verify_headers(headers=headers, transport="http", target=_signed_target(scope), body=body)
            except PermissionError as exc:
                await self._reject(scope, send, exc, before_body=False)
                return
        try:
            obj = parse_json(body)
        except ProtocolError as exc:
            await _respond(send, 400, {"error": str(exc)})
            return
        try:
            frame = decode_command(obj)
        except ProtocolError as exc:
            if isinstance(obj, dict) and obj.get("type") == "run_task" and getattr(exc, "run_id", None):
                stream = _Stream()
                self.engine.reject(exc, stream.sink)
                await _respond_events(send, stream.events, ndjson=NDJSON in headers.get("accept", ""))
            else:
                await _respond(send, 400, {"error": f"Not a Wove command: {exc}"})
            return
        frame_type = frame["type"]
        if frame_type == "run_task":
            await self._run(frame, receive, send, ndjson=NDJSON in headers.get("accept", ""))
        elif frame_type == "cancel_task":
            self.engine.cancel(frame["run_id"])
            await _respond_raw(send, 200, _EMPTY_EVENTS)
        else:  # shutdown
            if self.allow_remote_shutdown:
                asyncio.ensure_future(self.shutdown(frame.get("delivery_orphan_policy")))
            else:
                logger.info("http worker: ignored a shutdown command from %s (allow_remote_shutdown is off)",
                            _client(scope))
            await _respond_raw(send, 200, _EMPTY_EVENTS)

    async def _reject(self, scope: Scope, send: Send, exc: PermissionError, *, before_body: bool) -> None:
        status = 401 if isinstance(exc, MissingCredentialsError) else 403
        logger.warning("http worker: rejected a request from %s: %s", _client(scope), exc)
        extra = [(b"www-authenticate", b"Wove-HMAC")] if status == 401 else []
        if before_body:  # the unread body is not wanted: close instead of draining it
            extra.append((b"connection", b"close"))
        await _respond(send, status, {"error": f"Request rejected: {exc}"}, extra=extra)

    async def _read_body(self, headers: dict[str, str], receive: Receive, send: Send) -> bytes | None:
        if self.body_timeout is None:
            return await self._read_body_within(headers, receive, send)
        try:
            return await asyncio.wait_for(self._read_body_within(headers, receive, send), self.body_timeout)
        except asyncio.TimeoutError:
            await _respond(send, 408, {
                "error": f"The request body did not arrive within this worker's body_timeout of "
                         f"{self.body_timeout:g} seconds; send it faster, or start the worker with a larger "
                         "--body-timeout."
            }, extra=[(b"connection", b"close")])
            return None

    async def _read_body_within(self, headers: dict[str, str], receive: Receive, send: Send) -> bytes | None:
        length = headers.get("content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await _respond(send, 400, {"error": f"Invalid Content-Length {length[:32]!r}."})
                return None
            if declared > self.max_body_bytes:
                await self._too_large(send, declared)
                return None
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > self.max_body_bytes:
                    await self._too_large(send, size)
                    return None
                parts.append(chunk)
            if not message.get("more_body", False):
                break
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _too_large(self, send: Send, size: int) -> None:
        await _respond(send, 413, {
            "error": f"Request body of {size} bytes exceeds this worker's limit of {self.max_body_bytes} bytes; "
                     "start the worker with a larger --max-body-bytes or send smaller arguments."
        }, extra=[(b"connection", b"close")])

    async def _run(self, frame: dict[str, Any], receive: Receive, send: Send, *, ndjson: bool) -> None:
        stream = _Stream()
        self._streams.add(stream)
        watcher: asyncio.Task[None] | None = None
        started = finished = False
        collected: list[bytes] = []
        try:
            await self.engine.submit(frame, stream.sink)
            if not stream.events:
                await asyncio.sleep(0)  # a quick async task is usually done by now
            while True:
                if not stream.events:
                    if stream.closed or stream.disconnected:
                        break
                    if watcher is None:
                        watcher = asyncio.ensure_future(_watch_disconnect(receive, stream))
                    stream.wake.clear()
                    await stream.wake.wait()
                    continue
                batch, stream.events = stream.events, []
                lines = []
                for event in batch:
                    finished = finished or event.get("type") in TERMINAL_EVENTS
                    if ndjson or event.get("type") != "heartbeat":
                        lines.append(encode_event(event))
                if not ndjson:
                    collected.extend(lines)
                    if finished:
                        break
                    continue
                chunk = b"\n".join(lines) + b"\n" if lines else b""
                if not started:
                    if finished:  # the whole answer is known: one plain response
                        await _respond_raw(send, 200, chunk, _NDJSON_HEADERS)
                        return
                    await send({"type": "http.response.start", "status": 200, "headers": _NDJSON_HEADERS})
                    started = True
                await send({"type": "http.response.body", "body": chunk, "more_body": not finished})
                if finished:
                    return
            if stream.disconnected and not finished:
                self._abandon(frame)
                return
            if ndjson:
                if started:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                else:
                    await _respond_raw(send, 200, b"", _NDJSON_HEADERS)
            else:
                await _respond_raw(send, 200, b'{"events":[' + b",".join(collected) + b"]}")
        except asyncio.CancelledError:
            if not finished:
                self._abandon(frame)
            raise
        finally:
            self._streams.discard(stream)
            if watcher is not None:
                watcher.cancel()

    def _abandon(self, frame: dict[str, Any]) -> None:
        """The client went away before the terminal event."""
        delivery = frame.get("delivery") or {}
        keep = delivery.get("delivery_orphan_policy") in ("requeue", "detach") or delivery.get("delivery_idempotency_key")
        if keep:  # a re-delivery attaches to the running execution (or its cached result)
            logger.info("http worker: client left run %s; it keeps running (re-delivery attaches)", frame["run_id"])
        else:
            logger.info("http worker: client left run %s; cancelling it", frame["run_id"])
            self.engine.cancel(frame["run_id"])


async def _watch_disconnect(receive: Receive, stream: _Stream) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            stream.disconnected = True
            stream.wake.set()
            return


def _route_path(scope: Scope) -> str:
    path: str = scope["path"]
    root = scope.get("root_path") or ""
    if root and path.startswith(root):
        return path[len(root):]
    return path


def _signed_target(scope: Scope) -> str:
    """The request target the client signed: the path as sent (plus ``?query``)."""
    raw = scope.get("raw_path")
    if raw:
        path = raw.decode("latin-1")
    else:
        path = scope["path"]
        root = scope.get("root_path") or ""
        if root and not path.startswith(root):
            path = root + path
    query = scope.get("query_string") or b""
    return f"{path}?{query.decode('latin-1')}" if query else path


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "?"


async def _respond_raw(send: Send, status: int, body: bytes,
                       headers: list[tuple[bytes, bytes]] = _JSON_HEADERS) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _respond(send: Send, status: int, payload: Any, *, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    await _respond_raw(send, status, json.dumps(payload).encode(), [*_JSON_HEADERS, *(extra or ())])


async def _respond_events(send: Send, events: list[dict[str, Any]], *, ndjson: bool) -> None:
    encoded = [encode_event(e) for e in events]
    if ndjson:
        await _respond_raw(send, 200, b"".join(line + b"\n" for line in encoded), _NDJSON_HEADERS)
    else:
        await _respond_raw(send, 200, b'{"events":[' + b",".join(encoded) + b"]}")


def create_app(
    *,
    security: Any = None,
    engine: WorkerEngine | None = None,
    max_concurrency: int = 256,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    path: str = DEFAULT_PATH,
    allow_remote_shutdown: bool = False,
    shutdown_grace: float = 10.0,
    body_timeout: float | None = DEFAULT_BODY_TIMEOUT,
    header_timeout: float = DEFAULT_HEADER_TIMEOUT,
    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT,
) -> WorkerApp:
    """Build the worker service's ASGI application (arguments as for :class:`WorkerApp`).

    Mount it in another ASGI app (``Mount("/workers", app=create_app(...))``); call
    ``await app.shutdown()`` from the host application's lifespan shutdown, since
    routers do not forward lifespan events to mounted apps.
    """
    return WorkerApp(
        security=security, engine=engine, max_concurrency=max_concurrency, max_body_bytes=max_body_bytes,
        path=path, allow_remote_shutdown=allow_remote_shutdown, shutdown_grace=shutdown_grace,
        body_timeout=body_timeout, header_timeout=header_timeout, keepalive_timeout=keepalive_timeout,
    )


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind a listening TCP socket (port 0 picks a free one).

    Raises:
        OSError: the address cannot be bound (in use, not local, no permission).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def url_for(host: str, port: int, path: str, *, tls: bool) -> str:
    """The URL clients use for a service bound to ``host:port``."""
    shown = f"[{host}]" if ":" in host else host
    return f"{'https' if tls else 'http'}://{shown}:{port}{path or '/'}"


def uvicorn_config(app: WorkerApp, **options: Any) -> Any:
    """A ``uvicorn.Config`` tuned for the worker: httptools when installed, no access log,
    the app's ``keepalive_timeout`` and ``header_timeout`` (``options`` override)."""
    import uvicorn

    try:
        import httptools  # noqa: F401

        http: Any = _header_timeout_protocol(app.header_timeout)
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        http = "h11"
    settings: dict[str, Any] = {
        "http": http, "lifespan": "on", "access_log": False, "log_level": "warning",
        "backlog": 4096, "timeout_keep_alive": app.keepalive_timeout, "ws": "none",
    }
    settings.update(options)
    return uvicorn.Config(app, **settings)


def _header_timeout_protocol(header_timeout: float) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol, closing a connection that does not send complete
    request headers within ``header_timeout`` seconds of opening (or of starting its next
    request). uvicorn itself never times out a connection before its first request, nor
    headers sent a byte at a time."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HeaderTimeoutProtocol(HttpToolsProtocol):
        _wove_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)  # type: ignore[arg-type]
            self._wove_arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._wove_arm()

        def on_headers_complete(self) -> None:
            self._wove_disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._wove_disarm()
            super().connection_lost(exc)

        def _wove_arm(self) -> None:
            if self._wove_timer is None:
                self._wove_timer = self.loop.call_later(header_timeout, self._wove_expired)

        def _wove_disarm(self) -> None:
            if self._wove_timer is not None:
                self._wove_timer.cancel()
                self._wove_timer = None

        def _wove_expired(self) -> None:
            self._wove_timer = None
            if not self.transport.is_closing():
                logger.info("http worker: closing a connection from %s that sent no complete request headers "
                            "within header_timeout=%gs", _peer(self.transport), header_timeout)
                self.transport.close()

    return HeaderTimeoutProtocol


def _peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "?"


def make_server(app: WorkerApp, config: Any, *, on_ready: Callable[[], None] | None = None) -> Any:
    """A ``uvicorn.Server`` that shuts the engine down (by orphan policy) before it
    drains connections, and calls ``on_ready`` once it listens."""
    import uvicorn

    class _Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started and on_ready is not None:
                on_ready()

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            await app.shutdown()
            await super().shutdown(sockets=sockets)

    return _Server(config)
