"""The WebSocket worker service: a ``websockets`` server over one :class:`WorkerEngine`.

* The handshake is checked in ``process_request`` before the connection is accepted:
  a wrong path gets HTTP 404, missing credentials 401, wrong, replayed or expired ones
  403; nothing is decoded or executed for a rejected client.
* Each text message is one command. The events of a run go back on the connection that
  submitted it, as they happen; events queued within one loop tick are coalesced into
  one message (a JSON list, which Wove 2.x clients read too).
* When a connection closes, its runs end by their orphan policy: ``cancel`` and
  ``fail`` runs are cancelled; ``requeue`` and ``detach`` runs keep running, so a
  reconnecting client that re-delivers the same ``run_id`` attaches to the execution
  (or gets its cached terminal event).
* A ``shutdown`` command ends that connection's session (its ``cancel``/``fail`` runs),
  never the shared server. :meth:`WebSocketWorkerServer.stop` shuts down gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import ssl as ssl_module
import urllib.parse
from http import HTTPStatus
from typing import Any

from wove.errors import ProtocolError
from wove.protocol import TERMINAL_EVENTS, decode_command, encode_event, error_event
from wove.security import MissingCredentialsError, NetworkExecutorSecurity, canonical_http_target
from wove.worker import WorkerEngine

__all__ = ["DEFAULT_MAX_SIZE", "WebSocketWorkerServer", "run"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_SIZE = 256 * 1024 * 1024
#: Coalesced event messages stay below this (Wove 2.x clients accept 1 MiB messages).
COALESCE_LIMIT = 512 * 1024
#: Commands read, and events coalesced into one message, before the other side gets a turn.
PIPELINE_BATCH = 64
_PROGRESS = frozenset({"task_started", "heartbeat"})


class _Session:
    """One client connection: its runs and its event writer."""

    def __init__(self, server: WebSocketWorkerServer, ws: Any) -> None:
        self.server = server
        self.ws = ws
        self.runs: dict[str, str] = {}  # run_id -> orphan policy
        self.buffer: list[dict[str, Any]] = []
        self.wake = asyncio.Event()
        self.closed = False
        self.peer = str(getattr(ws, "remote_address", "?"))

    def sink(self, event: dict[str, Any]) -> None:
        """Engine sink: queue the event for the writer (never blocks; encoding happens there)."""
        if event.get("type") in TERMINAL_EVENTS:
            run_id = event.get("run_id")
            self.runs.pop(run_id, None)  # type: ignore[arg-type]
            if self.server._owners.get(run_id) is self:  # type: ignore[arg-type]
                del self.server._owners[run_id]  # type: ignore[arg-type]
        if self.closed:
            return
        self.buffer.append(event)
        if len(self.buffer) == 1:
            self.wake.set()

    def _encode_pending(self) -> list[bytes]:
        """Encode the queued events, leaving out a ``task_started`` or ``heartbeat`` whose
        run's terminal event is in the same batch (it carries nothing the terminal does not)."""
        events, self.buffer = self.buffer, []
        finished = {e.get("run_id") for e in events if e.get("type") in TERMINAL_EVENTS}
        if finished:
            events = [e for e in events if e.get("type") not in _PROGRESS or e.get("run_id") not in finished]
        return [encode_event(e) for e in events]

    async def write(self) -> None:
        """Send queued events; whatever queued since the last send goes in one message
        (a JSON list), split so that a coalesced message stays below ``COALESCE_LIMIT``."""
        ws = self.ws
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.buffer:
                pending = self._encode_pending()
                while pending:
                    size, count = 0, 0
                    for item in pending:
                        if count and (size + len(item) > COALESCE_LIMIT or count >= PIPELINE_BATCH):
                            break
                        size += len(item) + 1
                        count += 1
                    batch = pending[:count]
                    del pending[:count]
                    message = batch[0] if count == 1 else b"[" + b",".join(batch) + b"]"
                    await ws.send(message, text=True)

    async def read(self) -> None:
        """Decode commands and hand them to the engine."""
        server = self.server
        engine = server.engine
        recv = self.ws.recv
        sink = self.sink
        received = 0
        while True:
            data = await recv(decode=False)
            received += 1
            if received % PIPELINE_BATCH == 0:
                # Let the runs started so far execute and their events go out before reading
                # on: client and worker then overlap instead of taking turns in big waves.
                await asyncio.sleep(0)
            try:
                frame = decode_command(data)
            except ProtocolError as exc:
                engine.reject(exc, sink)
                continue
            frame_type = frame["type"]
            if frame_type == "run_task":
                run_id = frame["run_id"]
                if run_id not in self.runs and len(self.runs) >= server.max_runs_per_connection:
                    sink(error_event(
                        run_id, frame["task_id"], kind="TooManyRuns", retryable=True, source="executor",
                        message=f"Worker {engine.name}: this connection already has {len(self.runs)} runs in "
                        f"progress (max_runs_per_connection={server.max_runs_per_connection}); run {run_id} "
                        "was not started. Lower delivery_max_in_flight or raise --max-runs-per-connection.",
                    ))
                    continue
                self.runs[run_id] = str(frame["delivery"].get("delivery_orphan_policy") or "cancel")
                server._owners[run_id] = self
                await engine.submit(frame, sink)
            elif frame_type == "cancel_task":
                engine.cancel(str(frame["run_id"]))
            elif frame_type == "shutdown":
                self.end_runs(frame.get("delivery_orphan_policy"))
            else:  # pragma: no cover - decode_command only returns known types
                await engine.submit(frame, sink)

    def end_runs(self, override: str | None = None) -> None:
        """End this session's runs by orphan policy (requeue/detach keep running)."""
        for run_id, policy in list(self.runs.items()):
            effective = override or policy
            if self.server._owners.get(run_id) is not self:
                continue  # re-delivered on another connection: that one owns it now
            if effective in ("cancel", "fail"):
                self.server.engine.cancel(run_id)


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
    ) -> None:
        if not path.startswith("/"):
            raise ValueError(f"path must start with '/', got {path!r}.")
        if max_runs_per_connection < 1:
            raise ValueError(f"max_runs_per_connection must be at least 1, got {max_runs_per_connection}.")
        self.host = host
        self.path = path
        self.security = NetworkExecutorSecurity.from_config(security).resolve()
        self.engine = engine or WorkerEngine(max_concurrency=max_concurrency, name="websocket")
        self.max_size = max_size
        self.max_runs_per_connection = max_runs_per_connection
        self._requested_port = port
        self._ssl = ssl
        self._ping = (ping_interval, ping_timeout)
        self._server: Any = None
        self._sessions: set[_Session] = set()
        self._owners: dict[str, _Session] = {}
        self.port = 0

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
            max_size=self.max_size, max_queue=256, compression=None, ssl=self._ssl,
            ping_interval=self._ping[0], ping_timeout=self._ping[1],
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        logger.info("websocket worker listening on %s", self.url)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, end runs by orphan policy (``detach`` may finish within ``grace``),
        flush their events and close every connection with 1001 (going away)."""
        server, self._server = self._server, None
        if server is None:
            return
        # The engine refuses new runs from here on (WorkerShuttingDown, retryable); one
        # close() below then closes the listener and every connection (websockets
        # ignores a second close()).
        await self.engine.shutdown(grace=grace)
        for _ in range(50):  # let the writers send the final events (bounded)
            if not any(s.buffer for s in self._sessions if not s.closed):
                break
            await asyncio.sleep(0.01)
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
        if path != self.path:
            return connection.respond(HTTPStatus.NOT_FOUND, f"No Wove worker at {path!r}; this worker serves {self.path!r}.\n")
        if self.security.mode == "none":
            return None
        headers = {k.lower(): v for k, v in request.headers.raw_items()}
        try:
            self.security.verify_headers(
                headers=headers, transport="websocket", target=canonical_http_target(request.path), body=b"",
            )
        except MissingCredentialsError as exc:
            logger.warning("websocket worker: rejected a handshake without credentials: %s", exc)
            return connection.respond(HTTPStatus.UNAUTHORIZED, f"{exc} Set executor_config.security.\n")
        except PermissionError as exc:
            logger.warning("websocket worker: rejected a handshake: %s", exc)
            return connection.respond(HTTPStatus.FORBIDDEN, f"{exc}\n")
        return None

    # -- connections ---------------------------------------------------------------
    async def _handle(self, ws: Any) -> None:
        session = _Session(self, ws)
        self._sessions.add(session)
        writer = asyncio.get_running_loop().create_task(session.write())
        try:
            await session.read()
        except Exception as exc:  # ConnectionClosed and friends: the client went away
            logger.debug("websocket worker: connection %s ended: %r", session.peer, exc)
        finally:
            session.closed = True
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            self._sessions.discard(session)
            session.end_runs()


def _server_ssl(certfile: str | None, keyfile: str | None) -> ssl_module.SSLContext | None:
    if not certfile:
        if keyfile:
            raise ValueError("--keyfile needs --certfile.")
        return None
    context = ssl_module.SSLContext(ssl_module.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certfile, keyfile)
    return context


def run(args: argparse.Namespace) -> int:
    """``wove worker websocket``: serve until SIGINT/SIGTERM, then shut down gracefully."""
    from wove.cli import announce_listening

    async def main() -> None:
        server = WebSocketWorkerServer(
            host=args.host, port=args.port, path=getattr(args, "path", "/wove"), security=args.security,
            max_concurrency=args.max_concurrency, max_size=args.max_body_bytes,
            max_runs_per_connection=getattr(args, "max_runs_per_connection", 10_000),
            ssl=_server_ssl(getattr(args, "certfile", None), getattr(args, "keyfile", None)),
        )
        await server.start()
        announce_listening(server.url)
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(signum, stopping.set)
            except (NotImplementedError, RuntimeError):  # pragma: no cover - Windows
                pass
        try:
            await stopping.wait()
        finally:
            await server.stop()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:  # pragma: no cover
        pass
    return 0
