"""The HTTP worker service: a raw ASGI shell over :class:`wove.session.WorkerService`.

``create_app()`` returns an ASGI 3 application (no framework) that serves one command per
``POST`` at its path (default ``/wove``), mountable under Starlette, FastAPI or any ASGI
router. ``wove worker http`` serves it with uvicorn (:mod:`wove_executor_http.plugin`,
through :func:`wove.serve.run_service`).

Each request is one :class:`~wove.session.WorkerSession`. Per request, in this order and
before anything is unpickled:

1. with security on, the headers alone are checked (:meth:`WorkerService.precheck
   <wove.session.WorkerService.precheck>`: ``401`` when credentials are missing, ``403``
   for a wrong key id or token, or a bad, expired or future timestamp), before a byte of
   the body is read, and the connection is closed;
2. the body is read up to ``max_body_bytes`` (``413`` beyond, without reading the rest),
   within ``body_timeout`` seconds (``408`` after that: a slow or stalled sender);
3. the signature is verified on the raw bytes (``403`` when it is wrong or replayed);
4. the session decodes the command (``400`` for a body that is not JSON or not a command;
   a ``run_task`` whose pickles fail answers ``200`` with that run's ``task_error``).

Connections: served by uvicorn (:func:`uvicorn_config`), a connection must send complete
request headers within ``header_timeout`` seconds of opening (or of the previous
response), and an idle keep-alive connection is closed after ``keepalive_timeout``.

A ``run_task`` answers with its events: NDJSON, one event per line as it happens
(``task_started``, heartbeats, the terminal event), when the ``Accept`` header names
``application/x-ndjson``; otherwise one JSON body ``{"events": [...]}`` ending with the
terminal event (what Wove 2.x clients read). ``cancel_task`` answers at once with
``{"events": []}``; the cancelled run's own response ends with ``task_cancelled``.

Binary frames (docs/wire.md): a request body may be binary frames (``Content-Type:
application/x-wove-frames``; the body is recognised by its first bytes). A request whose
``Accept`` names ``application/x-wove-frames`` is answered with that content type when an
event carries bulky data: the events as binary frames back to back, in one body, or, when
``Accept`` also names ``application/x-ndjson``, written as they happen (small events as JSON
lines). A request that does not accept frames (every Wove 2.x client) is answered exactly as
before. The body limit (``max_body_bytes``, 256 MiB by
default) is the same for both.
Probes and metrics, without credentials and without task data (``GET`` or ``HEAD``;
paths relative to where the app is mounted):

* ``/healthz`` (and ``<path>/healthz``): liveness, ``200`` while the process serves,
  draining included;
* ``/readyz`` (and ``<path>/readyz``): readiness, ``200`` while the service accepts runs,
  ``503`` from the start of a drain (:attr:`wove.session.WorkerService.ready`);
* ``<path>/health``: what executors ask for the capabilities (``503`` while draining);
* ``/metrics``: Prometheus metrics (:mod:`wove.metrics`) when the app was made with
  ``metrics=True`` (``wove worker http --metrics``); otherwise ``404``.

Each answers JSON ``{"status": "ok" | "closing", "active": <runs>, "capabilities": [...]}``.

What a client that goes away means for its run, ``shutdown`` commands, the drain and the
limits are the session's rules, the same on every transport (:mod:`wove.session`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from wove.framing import worth_binary
from wove.protocol import encode_events
from wove.serve import bind_socket
from wove.session import (
    DEFAULT_MAX_COMMAND_BYTES,
    SERVICE_CAPABILITIES,
    Rejected,
    WorkerService,
    WorkerSession,
)
from wove.worker import WorkerEngine

__all__ = [
    "DEFAULT_BODY_TIMEOUT", "DEFAULT_HEADER_TIMEOUT", "DEFAULT_KEEPALIVE_TIMEOUT", "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_PATH", "FRAMES", "WorkerApp", "bind_socket", "create_app", "make_server", "start_server", "url_for",
    "uvicorn_config",
]

logger = logging.getLogger(__name__)

DEFAULT_PATH = "/wove"
DEFAULT_MAX_BODY_BYTES = DEFAULT_MAX_COMMAND_BYTES
#: Seconds the whole request body may take to arrive after the headers.
DEFAULT_BODY_TIMEOUT = 60.0
#: Seconds a connection may take to send complete request headers.
DEFAULT_HEADER_TIMEOUT = 30.0
#: Seconds an idle keep-alive connection is kept open (longer than the executor's 30 s
#: ``keepalive_expiry``, so the client, not the server, closes idle connections).
DEFAULT_KEEPALIVE_TIMEOUT = 35.0
NDJSON = "application/x-ndjson"
#: binary frames back to back (docs/wire.md, "Binary frames")
FRAMES = "application/x-wove-frames"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: every response names what this worker speaks beyond Wove 2.x (clients learn it from any answer)
_CAPABILITIES = (b"x-wove-capabilities", ", ".join(sorted(SERVICE_CAPABILITIES)).encode())
_JSON_HEADERS = [(b"content-type", b"application/json"), _CAPABILITIES]
_NDJSON_HEADERS = [(b"content-type", NDJSON.encode()), (b"cache-control", b"no-store"), _CAPABILITIES]
_FRAMES_HEADERS = [(b"content-type", FRAMES.encode()), _CAPABILITIES]
_FRAMES_STREAM_HEADERS = [(b"content-type", FRAMES.encode()), (b"cache-control", b"no-store"), _CAPABILITIES]
_CLOSE = (b"connection", b"close")


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
        shutdown_grace: seconds ``detach`` runs may take to finish on :meth:`shutdown`,
            and the default grace of :meth:`drain`.
        body_timeout: seconds the request body may take to arrive once the headers are
            in (``408`` after that); None for no limit.
        header_timeout: seconds a connection may take to send complete request headers
            (applied by :func:`uvicorn_config`; a mounting server applies its own).
        keepalive_timeout: seconds an idle keep-alive connection stays open (likewise).
        metrics: count Prometheus metrics and serve them at ``/metrics`` (True, or a
            :class:`wove.metrics.ServiceMetrics` to count into); needs ``wove-core[metrics]``.

    Attributes:
        service: the :class:`~wove.session.WorkerService` (engine, security, limits,
            rules); ``engine`` and ``security`` are its.

    Raises:
        ValueError / TypeError: invalid security configuration or limits.
        RuntimeError: a security environment variable is not set.
        ImportError: ``metrics`` without ``prometheus_client``.
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
        metrics: Any = False,
    ) -> None:
        if not isinstance(max_body_bytes, int) or isinstance(max_body_bytes, bool) or max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be a positive integer, got {max_body_bytes!r}.")
        for name, value in (("body_timeout", body_timeout), ("header_timeout", header_timeout),
                            ("keepalive_timeout", keepalive_timeout)):
            if value is None and name == "body_timeout":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}.")
        if not isinstance(path, str) or (path and not path.startswith("/")):
            raise ValueError(f"path must start with '/', got {path!r}.")
        self.service = WorkerService(
            engine, name="http", security=security, max_concurrency=max_concurrency,
            max_command_bytes=max_body_bytes, allow_remote_shutdown=allow_remote_shutdown, grace=shutdown_grace,
            metrics=metrics,
        )
        #: ``/metrics`` is served by this app (with ``--metrics-port`` they have a port of their own)
        self.metrics_endpoint = bool(metrics)
        self.path = path.rstrip("/")
        base = self.path
        self._probes = {"/healthz": "live", base + "/healthz": "live", "/readyz": "ready", base + "/readyz": "ready",
                        base + "/health": "health", "/metrics": "metrics"}
        self.body_timeout = None if body_timeout is None else float(body_timeout)
        self.header_timeout = float(header_timeout)
        self.keepalive_timeout = float(keepalive_timeout)
        self._challenge = b"Bearer" if self.service.security.mode == "bearer" else b"Wove-HMAC"

    @property
    def engine(self) -> WorkerEngine:
        return self.service.engine

    @property
    def security(self) -> Any:
        return self.service.security

    @property
    def max_body_bytes(self) -> int:
        return self.service.max_command_bytes

    @property
    def allow_remote_shutdown(self) -> bool:
        return self.service.allow_remote_shutdown

    @property
    def shutdown_grace(self) -> float:
        return self.service.grace

    # -- lifecycle -------------------------------------------------------------
    async def drain(self, grace: float | None = None) -> None:
        """The graceful stop (:meth:`wove.session.WorkerService.drain`): accept no new runs,
        let running ones finish within ``grace`` seconds (default ``shutdown_grace``), end
        the rest by orphan policy; every open response then ends (``requeue`` runs without
        a terminal event, so their clients deliver them again). Safe to call more than once."""
        await self.service.drain(grace)

    async def shutdown(self, policy: str | None = None) -> None:
        """Stop accepting runs and end running ones by their orphan policy now
        (:meth:`wove.session.WorkerService.shutdown`; ``detach`` runs may finish within
        ``shutdown_grace``). After a :meth:`drain` it only waits for the drain. Safe to call
        more than once."""
        await self.service.shutdown(policy)

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
        elif route in self._probes:
            if method not in ("GET", "HEAD"):
                await _respond(send, 405, {"error": f"Use GET for health checks and metrics; got {method}."},
                               extra=[(b"allow", b"GET, HEAD")])
                return
            await self._probe(self._probes[route], scope, send, head=method == "HEAD")
        else:
            await _respond(send, 404, {"error": f"No Wove endpoint at {route!r}; POST commands to {self.path or '/'}."})

    async def _probe(self, kind: str, scope: Scope, send: Send, *, head: bool) -> None:
        """Liveness, readiness, the executors' health check, or the metrics (module docstring)."""
        service = self.service
        if kind == "metrics":
            if service.metrics is None or not self.metrics_endpoint:
                await _respond(send, 404, {"error": "This worker does not serve metrics on this port; start it "
                                                    "with --metrics (or --metrics-port PORT for a port of their own)."})
                return
            accept = next((v.decode("latin-1") for k, v in scope["headers"] if k.lower() == b"accept"), "")
            body, content_type = service.metrics.render(accept)
            await _respond_raw(send, 200, b"" if head else body, [(b"content-type", content_type.encode()),
                                                                  (b"cache-control", b"no-store")], length=len(body))
            return
        status = 503 if (kind == "ready" and not service.ready) or (kind == "health" and service.closing) else 200
        body = json.dumps(service.health()).encode()
        await _respond_raw(send, status, b"" if head else body, [*_JSON_HEADERS, (b"cache-control", b"no-store")],
                           length=len(body))

    async def _command(self, scope: Scope, receive: Receive, send: Send) -> None:
        service = self.service
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            service.precheck(headers)  # from the headers alone: an anonymous or forged body is never read
        except Rejected as exc:
            await self._refuse(send, exc, close=True)  # the unread body is not wanted: close
            return
        try:
            body = await self._read_body(headers, receive, send)
            if body is None:
                return
            service.authenticate(headers, transport="http", target=_signed_target(scope), body=body)
        except Rejected as exc:
            await self._refuse(send, exc, close=exc.reason == "too_large")
            return
        session = service.session(_client(scope))
        try:
            try:
                await session.receive(body, strict=True)
                del body  # decoded: a large command is not held while its run executes
            except Rejected as exc:
                await self._refuse(send, exc, close=False)
                return
            # a request that started runs (or answered one) gets NDJSON when it asked for it;
            # cancel_task and shutdown always answer {"events": []} (binary: no frames).
            # A client that says it reads binary frames gets them for bulky events (a Wove 2.x
            # client never says so, and gets JSON).
            accept = headers.get("accept", "")
            session.binary = FRAMES in accept
            ndjson = (session.active or session.events_pending) and NDJSON in accept
            await self._answer(session, receive, send, ndjson=bool(ndjson))
        finally:
            session.connection_lost()  # the request is over: the one disconnect rule for what is left

    async def _answer(self, session: WorkerSession, receive: Receive, send: Send, *, ndjson: bool) -> None:
        """Send the session's events until its runs ended (or it did: drained, or the
        client went away)."""
        if session.active and not session.events_pending:
            await asyncio.sleep(0)  # a quick async task is usually done by now
        watcher: asyncio.Task[None] | None = None
        started = False
        collected: list[dict[str, Any]] = []
        binary = session.binary
        stream_headers = _FRAMES_STREAM_HEADERS if binary else _NDJSON_HEADERS
        try:
            while True:
                done = not session.active or session.ended
                if watcher is not None and watcher.done():
                    return  # the client went away: nobody to answer
                if ndjson:
                    data = session.data_to_send("lines", superseded=True)
                    chunk = data[0] if data else b""
                    if not started:
                        if done:  # the whole answer is known: one plain response
                            await _respond_raw(send, 200, chunk, stream_headers)
                            return
                        if chunk:
                            await send({"type": "http.response.start", "status": 200, "headers": stream_headers})
                            started = True
                    if chunk or done:
                        await send({"type": "http.response.body", "body": chunk, "more_body": not done})
                else:
                    collected.extend(session.take_events(heartbeats=False, superseded=True))
                    if done:
                        if binary and any(map(worth_binary, collected)):
                            await _respond_raw(send, 200, encode_events(collected, binary=True), _FRAMES_HEADERS)
                        else:
                            await _respond_raw(send, 200, encode_events(collected))
                if done:
                    return
                if watcher is None:
                    watcher = asyncio.ensure_future(_watch_disconnect(receive, session))
                await session.wait()
        finally:
            if watcher is not None:
                watcher.cancel()

    async def _refuse(self, send: Send, exc: Rejected, *, close: bool) -> None:
        extra = [(b"www-authenticate", self._challenge)] if exc.status == 401 else []
        if close:
            extra.append(_CLOSE)
        await _respond(send, exc.status, {"error": str(exc)}, extra=extra)

    async def _read_body(self, headers: dict[str, str], receive: Receive, send: Send) -> bytes | None:
        if self.body_timeout is None:
            return await self._read_body_within(headers, receive, send)
        try:
            return await asyncio.wait_for(self._read_body_within(headers, receive, send), self.body_timeout)
        except asyncio.TimeoutError:
            self.service.record_rejection("timeout")
            await _respond(send, 408, {
                "error": f"The request body did not arrive within this worker's body_timeout of "
                         f"{self.body_timeout:g} seconds; send it faster, or start the worker with a larger "
                         "--body-timeout."
            }, extra=[_CLOSE])
            return None

    async def _read_body_within(self, headers: dict[str, str], receive: Receive, send: Send) -> bytes | None:
        """The body, or None when the client left or was answered; :class:`Rejected` when
        it is (or is declared) over the limit, without reading the rest."""
        check_size = self.service.check_size
        length = headers.get("content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                self.service.record_rejection("bad_frame")
                await _respond(send, 400, {"error": f"Invalid Content-Length {length[:32]!r}."})
                return None
            check_size(declared)
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                check_size(size)
                parts.append(chunk)
            if not message.get("more_body", False):
                break
        return parts[0] if len(parts) == 1 else b"".join(parts)


async def _watch_disconnect(receive: Receive, session: WorkerSession) -> None:
    """Until the client goes away, then the session's disconnect rule."""
    while (await receive())["type"] != "http.disconnect":
        pass
    session.connection_lost()


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
                       headers: list[tuple[bytes, bytes]] = _JSON_HEADERS, *, length: int | None = None) -> None:
    """One whole response; ``length`` is the Content-Length when it is not ``len(body)`` (HEAD)."""
    size = len(body) if length is None else length
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(size).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _respond(send: Send, status: int, payload: Any, *, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    await _respond_raw(send, status, json.dumps(payload).encode(), [*_JSON_HEADERS, *(extra or ())])


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
    metrics: Any = False,
) -> WorkerApp:
    """Build the worker service's ASGI application (arguments as for :class:`WorkerApp`).

    Mount it in another ASGI app (``Mount("/workers", app=create_app(...))``); call
    ``await app.shutdown()`` (or ``await app.drain(grace)``) from the host application's
    lifespan shutdown, since routers do not forward lifespan events to mounted apps.
    """
    return WorkerApp(
        security=security, engine=engine, max_concurrency=max_concurrency, max_body_bytes=max_body_bytes,
        path=path, allow_remote_shutdown=allow_remote_shutdown, shutdown_grace=shutdown_grace,
        body_timeout=body_timeout, header_timeout=header_timeout, keepalive_timeout=keepalive_timeout,
        metrics=metrics,
    )


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

        http: Any = _header_timeout_protocol(app.header_timeout, app.service)
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        http = "h11"
    settings: dict[str, Any] = {
        "http": http, "lifespan": "on", "access_log": False, "log_level": "warning",
        "backlog": 4096, "timeout_keep_alive": app.keepalive_timeout, "ws": "none",
    }
    settings.update(options)
    return uvicorn.Config(app, **settings)


def _header_timeout_protocol(header_timeout: float, service: WorkerService) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol, closing a connection that does not send complete
    request headers within ``header_timeout`` seconds of opening (or of starting its next
    request). uvicorn itself never times out a connection before its first request, nor
    headers sent a byte at a time. It also reports each connection to the service's
    metrics (``wove_worker_connections_*``)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HeaderTimeoutProtocol(HttpToolsProtocol):
        _wove_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)  # type: ignore[arg-type]
            service.connection_opened()
            self._wove_arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._wove_arm()

        def on_headers_complete(self) -> None:
            self._wove_disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._wove_disarm()
            service.connection_closed()
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
    """A ``uvicorn.Server`` that ends the app's runs (by orphan policy; after a drain, it
    only waits for the drain) before it closes connections, and calls ``on_ready`` once it
    listens."""
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


async def start_server(app: WorkerApp, sock: socket.socket, config: Any, *,
                       timeout: float = 10.0) -> tuple[Any, asyncio.Task[None]]:
    """Serve ``app`` on the bound ``sock`` in this event loop: a :func:`make_server`
    uvicorn server as a task, without uvicorn's signal handlers (the host program, or
    :func:`wove.serve.run_service`, owns the signals). Returns ``(server, task)`` once it
    listens; set ``server.should_exit = True`` and await the task to stop it.

    Raises:
        RuntimeError: the server did not start (its error named) within ``timeout`` seconds.
    """
    ready = asyncio.Event()
    server = make_server(app, config, on_ready=ready.set)
    server.capture_signals = contextlib.nullcontext
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    waiting = asyncio.ensure_future(ready.wait())
    try:
        await asyncio.wait({waiting, task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        # Cancelled while starting (Ctrl-C during startup): stop the server the orderly
        # way, so its lifespan gets a shutdown message rather than a cancellation that
        # uvicorn would log as an error with a traceback.
        waiting.cancel()
        server.should_exit = True
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(asyncio.shield(task), 10)
        if not task.done():
            task.cancel()
        raise
    waiting.cancel()
    if not server.started:
        if task.done():
            error = task.exception()
            raise RuntimeError(f"HTTP worker service did not start: {error!r}" if error is not None
                               else "HTTP worker service did not start (see its log).")
        server.should_exit = True
        task.cancel()
        raise RuntimeError(f"HTTP worker service did not start within {timeout:g} seconds.")
    return server, task
