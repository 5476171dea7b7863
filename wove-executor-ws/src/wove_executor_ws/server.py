"""The WebSocket worker service: a ``websockets`` shell over :class:`wove.session.WorkerService`.

The handshake is checked in ``process_request`` before the connection is accepted (a
wrong path gets HTTP 404, missing credentials 401, wrong, replayed or expired ones 403);
each text message is one command (or a JSON list of commands), each binary message one or
more binary frames; the events of a run go back on the connection that submitted it as
they happen, the ones ready together coalesced into one message (a JSON list, which Wove
2.x clients read too).

Command lists: the handshake answer announces ``command_lists`` (when messages up to
:data:`COMMAND_LISTS_MIN_BYTES` are accepted), so our clients send the small commands they
queue together as one JSON list per text message (a Wove 2.x client sends one command per
message, which is read the same way).

Binary chunks: the handshake answer announces ``binary_chunks``: a large binary frame may
come as consecutive chunk messages, assembled into one buffer of the size the frame
declares (refused, closing with 1009, when that is over ``max_size``); to a client that
names ``binary_chunks`` in its handshake request, a large event goes as chunks too.

Binary frames: the handshake answer announces ``binary_frames`` (``X-Wove-Capabilities``).
A client that asks for them (the same header in its request) or sends a binary frame gets
the events that carry bulky data (a large result, streamed item or exception object) as
binary messages, a large one in WebSocket fragments without joining its buffers; small
events stay JSON text messages (cheaper on both sides). Any other client (Wove 2.x) only
ever gets JSON. Messages are never compressed (``compression=None``: permessage-deflate
would spend CPU on pickles and buffers that rarely shrink). Everything else (decoding,
limits, what a closed connection means for its runs, ``shutdown`` commands, slow
readers, drain) is the worker session's, the same as on every transport.

Probes and metrics: a plain HTTP ``GET`` (no WebSocket upgrade, no credentials) on the
same port is answered in ``process_request``, before any handshake check:

* ``/healthz``: liveness, ``200`` while the process serves, draining included;
* ``/readyz``: readiness, ``200`` while the service accepts runs, ``503`` from the start
  of a drain (:attr:`wove.session.WorkerService.ready`);
* ``/metrics``: Prometheus metrics (:mod:`wove.metrics`) when the server was made with
  ``metrics=True`` (``wove worker websocket --metrics``); otherwise ``404``.

Probe bodies are JSON ``{"status": "ok" | "closing", "active": <runs>, "capabilities": [...]}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import ssl as ssl_module
import urllib.parse
from http import HTTPStatus
from typing import Any

from wove.errors import ProtocolError
from wove.framing import ChunkAssembler, capability_names, chunks
from wove.protocol import (
    CAPABILITY_BINARY_CHUNKS,
    CAPABILITY_BINARY_FRAMES,
    CAPABILITY_COMMAND_LISTS,
)
from wove.security import canonical_http_target
from wove.session import DEFAULT_MAX_COMMAND_BYTES, Rejected, WorkerService, WorkerSession
from wove.worker import WorkerEngine

from .frames import CHUNK_BYTES, FRAGMENT_BYTES, fragments

__all__ = ["COMMAND_LISTS_MIN_BYTES", "DEFAULT_MAX_SIZE", "WebSocketWorkerServer", "run"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_SIZE = DEFAULT_MAX_COMMAND_BYTES
#: Coalesced event messages stay below this (Wove 2.x clients accept 1 MiB messages).
COALESCE_LIMIT = 512 * 1024
#: ``command_lists`` is announced only while every message up to this size is accepted:
#: a client's list message stays far below it (``LIST_BYTES`` in the executor), so
#: batching never turns commands that fit one by one into a message that does not.
COMMAND_LISTS_MIN_BYTES = 1024 * 1024
#: Commands read, and events coalesced into one message, before the other side gets a turn.
PIPELINE_BATCH = 64


async def _write(session: WorkerSession, ws: Any, chunked: bool = False) -> None:
    """Send the session's events until it ends and nothing is left: JSON lists as text
    messages; in a binary session, bulky events as binary messages (a large one in
    fragments, its buffers unjoined; to a client that reads ``binary_chunks``, one over
    :data:`CHUNK_BYTES` as chunk messages, each sent when the socket takes it)."""
    while True:
        await session.wait()
        for binary, parts in session.parts_to_send("list", max_message_bytes=COALESCE_LIMIT,
                                                   max_events_per_message=PIPELINE_BATCH):
            if not binary:
                await ws.send(parts[0], text=True)
                continue
            size = sum(map(len, parts))
            if size < FRAGMENT_BYTES:
                await ws.send(parts[0] if len(parts) == 1 else b"".join(parts))
            elif chunked and size > CHUNK_BYTES:
                for chunk in chunks(parts, CHUNK_BYTES):
                    await ws.send(chunk)
            else:
                await ws.send(fragments(parts))
            del parts  # a large result is not held while the next events go out
        if session.ended and not session.events_pending:
            return


async def _read(session: WorkerSession, ws: Any) -> None:
    """Hand each message to the session (a chunked binary frame once it is whole); pause
    while the client does not read its events."""
    recv = ws.recv
    received = 0
    assembler = ChunkAssembler(session.service.check_size, by_segment=True)
    while not session.ended:
        await session.wait_readable()
        data = await recv(decode=False)
        if assembler.pending or data[:1] == b"\x00":
            try:
                whole = assembler.feed(data)
            except (Rejected, ProtocolError) as exc:  # over the limit (refused before allocating), or malformed
                logger.warning("websocket worker: closing connection %s: %s", session.peer, exc)
                await ws.close(1009 if isinstance(exc, Rejected) else 1002, str(exc)[:120])
                return
            del data
            if whole is None:
                continue
            data = whole
        received += 1
        if received % PIPELINE_BATCH == 0:
            # Let the runs started so far execute and their events go out before reading
            # on: client and worker then overlap instead of taking turns in big waves.
            await asyncio.sleep(0)
        await session.receive(data)
        del data  # decoded: a large command is not held while its run executes


class WebSocketWorkerServer:
    """Serves a :class:`~wove.worker.WorkerEngine` over WebSocket.

    Use as an async context manager (or :meth:`start` / :meth:`stop`)::

        async with WebSocketWorkerServer(port=0) as server:
            print(server.url)  # ws://127.0.0.1:PORT/wove

    Args:
        host: interface to bind.
        port: port to bind (0 picks a free one; :attr:`port` tells which).
        path: the URL path served; other paths get HTTP 404.
        security: ``NetworkExecutorSecurity`` or a ``security`` config value
            (``"env:VAR"``, dict, ``"none"``); handshakes are verified against it.
        engine: the engine to serve (default: a new one with ``max_concurrency``).
        max_concurrency: runs executing at once (for the default engine).
        max_size: largest accepted message in bytes (commands; also the outgoing cap).
        max_runs_per_connection: runs one connection may have in progress.
        ssl: a server ``ssl.SSLContext`` to serve ``wss://``.
        ping_interval / ping_timeout: keepalive (seconds; None disables).
        allow_remote_shutdown: obey ``shutdown`` commands (off: the service is shared).
        metrics: count Prometheus metrics and answer ``GET /metrics`` on this port (True, or
            a :class:`wove.metrics.ServiceMetrics` to count into); needs ``wove-core[metrics]``.
        metrics_endpoint: answer ``GET /metrics`` here (default: when ``metrics`` is given;
            False when the metrics are served on a port of their own).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        path: str = "/wove",
        security: Any = None,
        engine: WorkerEngine | None = None,
        max_concurrency: int = 256,
        max_size: int | None = DEFAULT_MAX_SIZE,
        max_runs_per_connection: int = 10_000,
        ssl: ssl_module.SSLContext | None = None,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        allow_remote_shutdown: bool = False,
        metrics: Any = False,
        metrics_endpoint: bool | None = None,
    ) -> None:
        if not path.startswith("/"):
            raise ValueError(f"path must start with '/', got {path!r}.")
        if max_runs_per_connection < 1:
            raise ValueError(f"max_runs_per_connection must be at least 1, got {max_runs_per_connection}.")
        self.host = host
        self.path = path
        self.service = WorkerService(
            engine, name="websocket", security=security, max_concurrency=max_concurrency,
            max_command_bytes=max_size or DEFAULT_MAX_SIZE, max_runs_per_session=max_runs_per_connection,
            allow_remote_shutdown=allow_remote_shutdown, metrics=metrics,
        )
        self.metrics_endpoint = bool(metrics) if metrics_endpoint is None else metrics_endpoint
        self.engine = self.service.engine
        self.max_size = max_size
        self._requested_port = port
        self._ssl = ssl
        self._ping = (ping_interval, ping_timeout)
        self._server: Any = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def security(self) -> Any:
        return self.service.security

    @property
    def url(self) -> str:
        """The ``ws://`` (or ``wss://``) URL clients connect to."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'wss' if self._ssl else 'ws'}://{host}:{self.port}{self.path}"

    async def __aenter__(self) -> WebSocketWorkerServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Bind and start accepting connections.

        Raises:
            OSError: the address could not be bound.
        """
        from websockets.asyncio.server import serve

        self._server = await serve(
            self._handle, self.host, self._requested_port,
            process_request=self._process_request,
            process_response=self._process_response,
            max_size=self.max_size, max_queue=256, compression=None, ssl=self._ssl,
            ping_interval=self._ping[0], ping_timeout=self._ping[1],
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        logger.info("websocket worker listening on %s", self.url)

    async def stop(self, grace: float = 10.0) -> None:
        """Drain (:meth:`wove.session.WorkerService.drain`): runs finish within ``grace``,
        the rest end by orphan policy; their events are sent, then every connection
        closes with 1001 (going away)."""
        server, self._server = self._server, None
        if server is None:
            return
        await self.service.drain(grace)
        if self._handlers:  # the writers send the final events, then the handlers return
            await asyncio.wait(set(self._handlers), timeout=5.0)
        server.close(close_connections=True)
        try:
            await asyncio.wait_for(server.wait_closed(), 5.0)
        except asyncio.TimeoutError:
            logger.warning("websocket worker: connections did not close within 5s")

    async def serve_forever(self) -> None:
        """Serve until cancelled (call :meth:`start` first)."""
        await asyncio.Future()

    # -- handshake ---------------------------------------------------------------
    def _process_request(self, connection: Any, request: Any) -> Any:
        path = urllib.parse.urlsplit(request.path).path
        if path in _PROBES and path != self.path:
            return self._probe(connection, request, _PROBES[path])
        if path != self.path:
            return connection.respond(HTTPStatus.NOT_FOUND, f"No Wove worker at {path!r}; this worker serves {self.path!r}.\n")
        headers = {k.lower(): v for k, v in request.headers.raw_items()}
        try:
            self.service.authenticate(headers, transport="websocket", target=canonical_http_target(request.path))
        except Rejected as exc:
            return connection.respond(HTTPStatus(exc.status), f"{exc}\n")
        return None

    def _probe(self, connection: Any, request: Any, kind: str) -> Any:
        """Answer a probe or a scrape with plain HTTP (module docstring)."""
        service = self.service
        if kind == "metrics":
            if service.metrics is None or not self.metrics_endpoint:
                return connection.respond(HTTPStatus.NOT_FOUND, "This worker does not serve metrics on this port; "
                                          "start it with --metrics (or --metrics-port PORT).\n")
            body, content_type = service.metrics.render(request.headers.get("Accept", ""))
            response = connection.respond(HTTPStatus.OK, "")
            response.body = body
            _set_header(response.headers, "Content-Type", content_type)
            _set_header(response.headers, "Content-Length", str(len(body)))
            return response
        ready = service.ready if kind == "ready" else True
        response = connection.respond(HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE,
                                      json.dumps(service.health()) + "\n")
        _set_header(response.headers, "Content-Type", "application/json")
        return response

    def _process_response(self, connection: Any, request: Any, response: Any) -> None:
        """The handshake answer names what this worker speaks beyond Wove 2.x (``X-Wove-Capabilities``)."""
        if response.status_code == HTTPStatus.SWITCHING_PROTOCOLS:
            capabilities = self.service.capabilities | {CAPABILITY_BINARY_CHUNKS}
            if self.service.max_command_bytes >= COMMAND_LISTS_MIN_BYTES:
                capabilities = capabilities | {CAPABILITY_COMMAND_LISTS}
            response.headers["X-Wove-Capabilities"] = ", ".join(sorted(capabilities))

    # -- connections ---------------------------------------------------------------
    async def _handle(self, ws: Any) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.service.connection_opened()
        try:
            await self._converse(ws)
        finally:
            self.service.connection_closed()
            self._handlers.discard(task)

    async def _converse(self, ws: Any) -> None:
        session = self.service.session(str(getattr(ws, "remote_address", "?")))
        request = getattr(ws, "request", None)
        asked: frozenset[str] = frozenset()
        if request is not None:  # what the client said it reads, in its handshake
            asked = capability_names(request.headers.get("X-Wove-Capabilities", ""))
            session.binary = CAPABILITY_BINARY_FRAMES in asked
        writer = asyncio.get_running_loop().create_task(_write(session, ws, CAPABILITY_BINARY_CHUNKS in asked))
        reader = asyncio.get_running_loop().create_task(_read(session, ws))
        try:
            await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
            if reader.done() and reader.exception() is not None:
                logger.debug("websocket worker: connection %s ended: %r", session.peer, reader.exception())
                sent = getattr(reader.exception(), "sent", None)
                if getattr(sent, "code", None) == 1009:  # websockets refused a message over max_size
                    self.service.record_rejection("too_large")
        finally:
            if not session.ended or writer.done():
                session.connection_lost()
            else:  # drained: the writer sends what is left
                await asyncio.wait({writer}, timeout=5.0)
            for part in (reader, writer):
                part.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)
            session.connection_lost()


#: plain-HTTP paths answered on the WebSocket port (module docstring)
_PROBES = {"/healthz": "live", "/readyz": "ready", "/metrics": "metrics"}


def _set_header(headers: Any, name: str, value: str) -> None:
    """Replace a header of a ``websockets`` response."""
    if name in headers:
        del headers[name]
    headers[name] = value


def _server_ssl(certfile: str | None, keyfile: str | None) -> ssl_module.SSLContext | None:
    if not certfile:
        if keyfile:
            raise ValueError("--keyfile needs --certfile.")
        return None
    context = ssl_module.SSLContext(ssl_module.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certfile, keyfile)
    return context


def run(args: argparse.Namespace) -> int:
    """``wove worker websocket``: serve until SIGINT/SIGTERM, then drain (:mod:`wove.serve`)."""
    from wove.serve import run_service

    metrics_port = getattr(args, "metrics_port", None)
    server = WebSocketWorkerServer(
        host=args.host, port=args.port, path=getattr(args, "path", "/wove"), security=args.security,
        max_concurrency=args.max_concurrency, max_size=args.max_body_bytes,
        max_runs_per_connection=getattr(args, "max_runs_per_connection", 10_000),
        ssl=_server_ssl(getattr(args, "certfile", None), getattr(args, "keyfile", None)),
        allow_remote_shutdown=getattr(args, "allow_remote_shutdown", False),
        metrics=getattr(args, "metrics", False) or metrics_port is not None,
        metrics_endpoint=getattr(args, "metrics", False),
    )

    async def start() -> str:
        await server.start()
        return server.url

    return run_service("websocket", start, server.stop, grace=getattr(args, "grace", 10.0), service=server.service,
                       metrics_port=metrics_port, metrics_host=getattr(args, "metrics_host", None))
