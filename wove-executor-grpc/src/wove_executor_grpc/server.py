"""The reference gRPC worker service: a grpc.aio shell over :class:`wove.session.WorkerService`.

No generated stubs: raw-bytes generic handlers serve three methods of the service
``wove.network_executor.WorkerService``, each call one :class:`~wove.session.WorkerSession`:

* ``Send`` (unary-unary, the Wove 2.x method): the request is one JSON command; the
  response is ``{"events": [...]}`` holding the run's events and ending with its
  terminal event (heartbeats are left out: they only matter while the run is live).
  ``cancel_task`` and ``shutdown`` answer at once with ``{"events": []}``.
* ``Stream`` (unary-stream, a Wove extension): the request is one JSON command; every
  response message is one JSON event, sent as it happens (``task_started``,
  ``heartbeat``, then the terminal event).
* ``Session`` (stream-stream, a Wove extension): many commands and events on one call
  (see :meth:`GrpcWorkerService.handlers`).

Binary frames (docs/wire.md): the Session confirmation announces ``binary_frames`` in
``wove-capabilities``. A request that holds binary frames (one or several back to back)
is answered in binary frames: ``Send`` with the run's events back to back in one message,
``Stream`` one frame per message, ``Session`` frames back to back (a large event alone in its
message). A JSON request (every Wove 2.x client) gets exactly the JSON above.

This module does only the I/O. Verification, decoding, size limits, what an ended call
means for its runs, ``shutdown`` commands, slow readers and the drain are the worker
session's, the same on every transport. A request the session refuses ends the call with
the status of :data:`REJECTED_STATUS` (missing credentials → ``UNAUTHENTICATED``; wrong,
replayed or expired ones → ``PERMISSION_DENIED``; a command that does not decode →
``INVALID_ARGUMENT``; one over the size limit → ``RESOURCE_EXHAUSTED``). Nothing is
unpickled or executed for a refused request.

Health: the server also serves the standard gRPC health checking service
``grpc.health.v1.Health`` (``grpcio-health-checking``; Kubernetes' native ``grpc`` probe,
``grpc_health_probe``), without credentials. Its statuses (:data:`HEALTH_SERVICES`):
the overall status (service ``""``) and ``wove.network_executor.WorkerService`` are
readiness, ``SERVING`` while the service accepts runs and ``NOT_SERVING`` from the start
of a drain (or a ``shutdown``); :data:`LIVENESS_SERVICE` (``"liveness"``) stays
``SERVING`` while the process serves, draining included. Other names are ``NOT_FOUND``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from wove.errors import ProtocolError
from wove.framing import ChunkAssembler, capability_names, chunks, worth_binary
from wove.protocol import CAPABILITY_BINARY_CHUNKS, CAPABILITY_BINARY_FRAMES, encode_events
from wove.registry import install_hint
from wove.security import NetworkExecutorSecurity
from wove.session import DEFAULT_MAX_COMMAND_BYTES, Rejected, WorkerService, WorkerSession
from wove.worker import WorkerEngine

from ._pem import read_pem
from .chunking import CHUNK_BYTES, CHUNKED_ABOVE

if TYPE_CHECKING:
    import argparse

    import grpc

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_KEEPALIVE_INTERVAL",
    "DEFAULT_KEEPALIVE_TIMEOUT",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "HEALTH_SERVICES",
    "LIVENESS_SERVICE",
    "REJECTED_STATUS",
    "SEND_METHOD",
    "SERVICE",
    "SESSION_CONFIRMATION",
    "SESSION_METHOD",
    "STREAM_METHOD",
    "GrpcWorkerServer",
    "GrpcWorkerService",
    "run",
    "serve",
    "start_server",
]

logger = logging.getLogger(__name__)

SERVICE = "wove.network_executor.WorkerService"
SEND_METHOD = f"/{SERVICE}/Send"
STREAM_METHOD = f"/{SERVICE}/Stream"
SESSION_METHOD = f"/{SERVICE}/Session"
#: Largest request (and response) message, in bytes: the one default size limit.
DEFAULT_MAX_MESSAGE_BYTES = DEFAULT_MAX_COMMAND_BYTES
#: Seconds a new connection may take to finish its TLS and HTTP/2 setup.
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
#: Seconds a connection without calls stays open.
DEFAULT_IDLE_TIMEOUT = 300.0
#: Seconds between the server's keepalive pings, and how long it waits for the answer.
DEFAULT_KEEPALIVE_INTERVAL = 60.0
DEFAULT_KEEPALIVE_TIMEOUT = 20.0
#: Initial metadata a Session sends before it reads any command: clients write commands
#: only once a server confirmed it serves Session (a server without it answers UNIMPLEMENTED).
SESSION_CONFIRMATION: tuple[tuple[str, str], ...] = (("wove-session", "1"),)
#: The one table from a refusal of the worker session (:attr:`wove.session.Rejected.reason`)
#: to the gRPC status the call ends with.
REJECTED_STATUS: dict[str, str] = {
    "unauthenticated": "UNAUTHENTICATED",
    "permission_denied": "PERMISSION_DENIED",
    "too_large": "RESOURCE_EXHAUSTED",
    "bad_request": "INVALID_ARGUMENT",
}
#: The health service name a liveness probe asks for: ``SERVING`` while the process serves,
#: through the drain (a probe that failed then would kill the runs the drain lets finish).
LIVENESS_SERVICE = "liveness"
#: The names ``grpc.health.v1.Health`` answers for: readiness ("" and the worker service)
#: and :data:`LIVENESS_SERVICE`.
HEALTH_SERVICES = ("", SERVICE, LIVENESS_SERVICE)
#: Seconds :meth:`GrpcWorkerService.close` waits, after the drain, for calls to send their
#: last events (a Session to a slow reader) before the server cancels them.
CLOSE_TIMEOUT = 5.0


def _millis(value: float | None, name: str) -> int | None:
    """Seconds (or None: off) as the integer milliseconds grpc options take."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a positive number of seconds or None (off), got {value!r}.")
    return max(1, round(float(value) * 1000))


def _server_options(
    max_message_bytes: int,
    *,
    handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
    keepalive_interval: float | None = DEFAULT_KEEPALIVE_INTERVAL,
    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT,
    max_connection_age: float | None = None,
    max_connection_age_grace: float | None = None,
) -> list[tuple[str, Any]]:
    """The server's grpc options: message limits, pings and connection timeouts (see start_server)."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # clients keep long calls alive with pings (the executor pings every 30 s)
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 0),
    ]
    # A connection that never completes its TLS / HTTP/2 setup (a raw TCP connection that
    # sends nothing, a slow handshake) is closed after handshake_timeout.
    handshake = _millis(handshake_timeout, "handshake_timeout")
    # grpc's own default is 120 s; "off" is approximated by a day
    options.append(("grpc.server_handshake_timeout_ms", handshake if handshake is not None else 86_400_000))
    # A connection without calls for idle_timeout gets GOAWAY and is closed (clients reconnect).
    idle = _millis(idle_timeout, "idle_timeout")
    if idle is not None:
        options.append(("grpc.max_connection_idle_ms", idle))
    # The server pings every keepalive_interval; a peer that does not answer within
    # keepalive_timeout (a dead host, a half-open connection) is dropped with its calls.
    interval = _millis(keepalive_interval, "keepalive_interval")
    if interval is not None:
        timeout = _millis(keepalive_timeout, "keepalive_timeout")
        options += [("grpc.keepalive_time_ms", interval), ("grpc.keepalive_timeout_ms", timeout),
                    ("grpc.http2.max_pings_without_data", 0)]
    # Connections older than max_connection_age get GOAWAY; their calls have
    # max_connection_age_grace more to finish (off by default: a Session lasts for hours).
    age = _millis(max_connection_age, "max_connection_age")
    if age is not None:
        options.append(("grpc.max_connection_age_ms", age))
        grace = _millis(max_connection_age_grace, "max_connection_age_grace")
        if grace is not None:
            options.append(("grpc.max_connection_age_grace_ms", grace))
    elif max_connection_age_grace is not None:
        raise ValueError("max_connection_age_grace needs max_connection_age (got only the grace).")
    return options


class GrpcWorkerService:
    """The Send/Stream/Session handlers over one :class:`~wove.session.WorkerService`.

    Args:
        engine: the worker engine (a new one with ``max_concurrency`` when omitted).
        security: verifies request metadata (a :class:`NetworkExecutorSecurity` or its
            config: ``"env:VAR"``, a dict, ``"none"``); ``None`` accepts unauthenticated
            requests.
        send_method / stream_method / session_method: full method paths served
            (``session_method=None``: no Session, as a Wove 2.x server).
        allow_remote_shutdown: obey a client's ``shutdown`` command (off: a service
            shared by many clients must not be stopped by one of them).
        max_message_bytes: largest accepted command.
        max_runs_per_session: runs one Session call may have in progress.
        max_concurrency: runs executing at once (for the default engine).
        metrics: count Prometheus metrics (True, or a :class:`wove.metrics.ServiceMetrics`
            to count into; served by ``wove worker grpc --metrics-port``).

    Attributes:
        worker: the :class:`~wove.session.WorkerService` (engine, security, limits, drain).
    """

    def __init__(
        self,
        engine: WorkerEngine | None = None,
        *,
        security: NetworkExecutorSecurity | str | dict[str, Any] | None = None,
        send_method: str = SEND_METHOD,
        stream_method: str = STREAM_METHOD,
        session_method: str | None = SESSION_METHOD,
        allow_remote_shutdown: bool = False,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_runs_per_session: int = 10_000,
        max_concurrency: int = 256,
        metrics: Any = False,
    ) -> None:
        self.worker = WorkerService(
            engine, name="grpc", security=security, allow_remote_shutdown=allow_remote_shutdown,
            max_command_bytes=max_message_bytes, max_runs_per_session=max_runs_per_session,
            max_concurrency=max_concurrency, metrics=metrics,
        )
        self.send_method = send_method
        self.stream_method = stream_method
        self.session_method = session_method
        self._calls: set[asyncio.Task[Any]] = set()

    @property
    def engine(self) -> WorkerEngine:
        return self.worker.engine

    @property
    def security(self) -> NetworkExecutorSecurity:
        return self.worker.security

    @property
    def allow_remote_shutdown(self) -> bool:
        return self.worker.allow_remote_shutdown

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        """Generic handlers to pass to ``server.add_generic_rpc_handlers``.

        ``Session`` (bidirectional): authenticated once, at call start (signed over the
        method path and an empty body, like a WebSocket handshake); then the server
        confirms the method with the initial metadata :data:`SESSION_CONFIRMATION` before
        it reads any command. Each request message is one command, a JSON list of
        commands, or binary frames back to back; each response message is
        ``{"events": [...]}`` with the events that were ready (binary frames back to back
        once the client wrote a binary frame). A command that does not decode is answered with a ``task_error`` (or a
        ``log``) on the session; nothing runs for it. While the client leaves
        ``max_pending_events`` events unread, no further command is read. After the
        client finished writing, the call ends (OK) once its runs have their terminal
        events. On a drain the call sends every event until each run has its terminal
        event, then ends with OK; runs the drain left for re-delivery (``requeue``) have
        none: the call then ends with ``UNAVAILABLE`` naming them, after all the other
        events, so their client delivers them again elsewhere.
        """
        import grpc

        by_service: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

        def add(path: str, handler: grpc.RpcMethodHandler) -> None:
            service, method = path.lstrip("/").rsplit("/", 1)
            by_service.setdefault(service, {})[method] = handler

        add(self.send_method, grpc.unary_unary_rpc_method_handler(self._send))
        add(self.stream_method, grpc.unary_stream_rpc_method_handler(self._stream))
        if self.session_method:
            add(self.session_method, grpc.stream_stream_rpc_method_handler(self._session))
        return [grpc.method_handlers_generic_handler(name, methods) for name, methods in by_service.items()]

    async def close(self, grace: float = 5.0) -> None:
        """Drain (:meth:`wove.session.WorkerService.drain`): runs finish within ``grace``
        seconds, the rest end by orphan policy; every call sends its last events and ends
        (``UNAVAILABLE`` for a call still waiting for a ``requeue`` run's terminal event)."""
        await self.worker.drain(grace)
        calls = {call for call in self._calls if call is not asyncio.current_task()}
        if calls:
            await asyncio.wait(calls, timeout=CLOSE_TIMEOUT)

    # -- calls ------------------------------------------------------------------
    async def _open(self, context: grpc.aio.ServicerContext, method: str, request: bytes) -> WorkerSession:
        """Verify the call (metadata, size), then start its session."""
        metadata = tuple(context.invocation_metadata() or ())
        try:
            self.worker.authenticate(metadata, transport="grpc", target=method, body=request)
        except Rejected as exc:
            await _refuse(context, exc)
        task = asyncio.current_task()
        if task is not None:
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)
        session = self.worker.session(str(context.peer()))
        # a client that says it reads binary frames gets them for bulky events (as one that
        # sent a binary frame does); a Wove 2.x client never says so
        session.binary = any(key == "wove-capabilities" and CAPABILITY_BINARY_FRAMES in str(value)
                             for key, value in metadata)
        return session

    async def _send(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        session = await self._open(context, self.send_method, request)
        try:
            try:
                await session.receive(request, strict=True, strict_runs=True)
            except Rejected as exc:
                await _refuse(context, exc)
            events: list[dict[str, Any]] = []
            while True:
                events += session.take_events(heartbeats=False, superseded=True)  # Wove 2.x replies carry task_started
                if not session.active:  # a binary client gets binary frames when a result is bulky
                    return encode_events(events, "envelope",
                                         binary=session.binary and any(map(worth_binary, events)))
                if session.ended:
                    await _unavailable(context, session)
                await session.wait()
        finally:
            session.connection_lost()  # the call ended (or the client went away): the one disconnect rule

    async def _stream(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        session = await self._open(context, self.stream_method, request)
        try:
            try:
                await session.receive(request, strict=True, strict_runs=True)
            except Rejected as exc:
                await _refuse(context, exc)
            while True:
                for message in session.data_to_send("each", superseded=True):
                    yield message
                if session.events_pending:
                    continue  # events that came while those were written go first
                if not session.active:
                    return
                if session.ended:
                    await _unavailable(context, session)
                await session.wait()
        finally:
            session.connection_lost()

    async def _session(self, requests: AsyncIterator[bytes],
                       context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        """The Session method (see :meth:`handlers`)."""
        import grpc

        assert self.session_method is not None
        if self.worker.closing:
            self.worker.record_rejection("draining")
            await context.abort(grpc.StatusCode.UNAVAILABLE, "The worker service is shutting down; "
                                "deliver the runs to another worker.")
        session = await self._open(context, self.session_method, b"")
        # the confirmation also names what this worker speaks beyond Wove 2.x (wove-capabilities),
        # binary_chunks included (a Session-only capability of this shell)
        offered = ", ".join(sorted(self.worker.capabilities | {CAPABILITY_BINARY_CHUNKS}))
        await context.send_initial_metadata((*SESSION_CONFIRMATION, ("wove-capabilities", offered)))
        # a client that asked for binary_chunks gets a binary frame over CHUNKED_ABOVE in chunks
        chunked = any(key == "wove-capabilities" and CAPABILITY_BINARY_CHUNKS in capability_names(value)
                      for key, value in context.invocation_metadata() or ())
        reader = asyncio.get_running_loop().create_task(_read(session, requests, self.worker.check_size))
        try:
            while True:
                await session.wait()
                if not session.binary:  # JSON: one {"events": [...]} per message
                    for message in session.data_to_send("envelope"):
                        yield message
                else:  # binary frames back to back, a large result alone in its message (no copy)
                    for binary, parts in session.parts_to_send("list", max_message_bytes=_BINARY_BATCH_BYTES):
                        if chunked and binary and sum(memoryview(part).nbytes for part in parts) > CHUNKED_ABOVE:
                            for chunk in chunks(parts, CHUNK_BYTES):
                                yield chunk
                        else:
                            yield parts[0] if len(parts) == 1 and type(parts[0]) is bytes else b"".join(parts)
                    parts = []  # a large result's buffers are not held while the session waits
                if session.events_pending:
                    continue  # events that came while that message was written go first
                if session.ended or (reader.done() and not session.active):
                    break
            failure = reader.exception() if reader.done() and not reader.cancelled() else None
            if isinstance(failure, Rejected):
                await _refuse(context, failure)
            if session.runs:
                await _unavailable(context, session)
        finally:
            reader.cancel()
            session.connection_lost()


#: Binary Session messages hold frames back to back up to this size (a larger event goes alone).
_BINARY_BATCH_BYTES = 4 * 1024 * 1024


async def _read(session: WorkerSession, requests: AsyncIterator[bytes], check_size: Callable[[int], None]) -> None:
    """Hand each Session message (or chunked binary frame, once whole) to the session; pause
    while the client does not read its events. The client finished writing and nothing runs:
    the conversation is over. A chunked frame over the size limit ends the call
    (``RESOURCE_EXHAUSTED``, as gRPC's own limit ends it for one message)."""
    messages = requests.__aiter__()
    reassembler = ChunkAssembler(check_size, drop_refused=True, by_segment=True)
    try:
        while not session.ended:
            await session.wait_readable()
            try:
                message = await messages.__anext__()
            except StopAsyncIteration:
                break
            try:
                data = reassembler.feed(message)
            except ProtocolError as exc:
                raise Rejected("bad_request", f"Not a Wove command: {exc}") from exc
            del message
            if data is None:
                continue  # a chunk: the frame is not whole yet
            await session.receive(data)
            del data  # decoded: a large command is not held while its run executes
    except BaseException:
        session.connection_lost()  # ends the session: the writer sends what is left, the call fails
        raise
    if not session.active:
        session.connection_lost()


async def _refuse(context: grpc.aio.ServicerContext, rejected: Rejected) -> NoReturn:
    """End the call with the status of :data:`REJECTED_STATUS`. The details say what was
    wrong; the client adds the fix (a Wove 2.x client shows the details as they are)."""
    import grpc

    await context.abort(getattr(grpc.StatusCode, REJECTED_STATUS[rejected.reason]), rejected.detail)
    raise AssertionError("unreachable: abort raises")  # pragma: no cover


async def _unavailable(context: grpc.aio.ServicerContext, session: WorkerSession) -> NoReturn:
    """The service drained while runs of this call had no terminal event (``requeue``)."""
    import grpc

    await context.abort(
        grpc.StatusCode.UNAVAILABLE,
        f"The worker service is shutting down; run {', '.join(session.runs)} did not finish here.",
    )
    raise AssertionError("unreachable: abort raises")  # pragma: no cover


async def _health_servicer(worker: WorkerService) -> Any:
    """The ``grpc.health.v1.Health`` servicer of a worker service (module docstring): every
    name of :data:`HEALTH_SERVICES` ``SERVING``; the readiness names turn ``NOT_SERVING``
    when the service starts to drain or shut down."""
    from grpc_health.v1 import health, health_pb2

    servicer = health.aio.HealthServicer()
    for name in HEALTH_SERVICES:
        await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def not_ready() -> None:
        for name in HEALTH_SERVICES:
            if name != LIVENESS_SERVICE:
                await servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    worker.add_closing_callback(not_ready)
    return servicer


@dataclass(eq=False)
class GrpcWorkerServer:
    """A running server: its bound ``port``, ``host``, the service it serves and its
    ``grpc.health.v1.Health`` servicer (``health``: ``grpc_health.v1.health.aio.HealthServicer``)."""

    server: Any
    service: GrpcWorkerService
    host: str
    port: int
    tls: bool
    health: Any = None
    _stopped: bool = field(default=False, repr=False)

    @property
    def target(self) -> str:
        """``host:port`` to put in ``executor_config.target``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def worker(self) -> WorkerService:
        """The :class:`~wove.session.WorkerService` behind the handlers."""
        return self.service.worker

    async def stop(self, grace: float = 5.0) -> None:
        """Drain (:meth:`GrpcWorkerService.close`): runs in flight finish within ``grace``
        seconds, the rest end by orphan policy with a terminal event to their calls; then
        the server stops (calls still open are cancelled)."""
        if self._stopped:
            return
        self._stopped = True
        await self.service.close(grace=grace)
        await self.server.stop(grace=min(grace, 1.0))

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


async def start_server(
    engine: WorkerEngine | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    security: NetworkExecutorSecurity | str | dict[str, Any] | None = None,
    certfile: str | bytes | Path | None = None,
    keyfile: str | bytes | Path | None = None,
    client_ca: str | bytes | Path | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    options: list[tuple[str, Any]] | None = None,
    allow_remote_shutdown: bool = False,
    max_runs_per_session: int = 10_000,
    handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
    keepalive_interval: float | None = DEFAULT_KEEPALIVE_INTERVAL,
    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT,
    max_connection_age: float | None = None,
    max_connection_age_grace: float | None = None,
    metrics: Any = False,
) -> GrpcWorkerServer:
    """Start a grpc.aio worker service on the running loop, with the standard health
    service (module docstring).

    Args:
        engine: the worker engine (default: a new one).
        host / port: where to bind; ``port=0`` picks a free port (see ``.port``).
        security: request verification (a :class:`NetworkExecutorSecurity` or its config:
            ``"env:VAR"``, a dict, ``"none"``).
        certfile / keyfile: serve TLS with this certificate chain and key (paths, PEM
            text or bytes). ``client_ca``: also require client certificates signed by it (mTLS).
        max_message_bytes: largest accepted request and sent response.
        options: extra grpc server options; one named like a default replaces it.
        allow_remote_shutdown: obey a client's ``shutdown`` command.
        max_runs_per_session: runs one Session call may have in progress.
        handshake_timeout: seconds a new connection may take to complete its TLS and
            HTTP/2 setup (``grpc.server_handshake_timeout_ms``); a TCP connection that
            sends nothing is closed after it. ``None``: off.
        idle_timeout: seconds a connection without calls stays open before the server
            sends GOAWAY and closes it (``grpc.max_connection_idle_ms``). ``None``: off.
        keepalive_interval / keepalive_timeout: the server pings each connection every
            ``keepalive_interval`` seconds and drops it (and its calls) when no answer comes
            within ``keepalive_timeout`` (``grpc.keepalive_time_ms`` / ``_timeout_ms``).
            ``keepalive_interval=None``: no server pings.
        max_connection_age / max_connection_age_grace: GOAWAY connections older than this,
            then give their calls the grace to finish (``grpc.max_connection_age_ms`` /
            ``_grace_ms``). Off by default: one Session call may rightly last for hours.
        metrics: count Prometheus metrics (True, or a :class:`wove.metrics.ServiceMetrics`);
            serve them with :meth:`wove.metrics.ServiceMetrics.serve`.

    Raises:
        ImportError: grpcio (or grpcio-health-checking) is not installed; ``metrics``
            without ``prometheus_client``.
        ValueError: only one of certfile/keyfile, a client CA without TLS, an unreadable
            file, a timeout that is not a positive number, or the address cannot be bound;
            an invalid security configuration or limit.
        RuntimeError: a security environment variable is not set.
    """
    try:
        import grpc
    except ImportError as exc:  # pragma: no cover - grpcio is a dependency
        raise ImportError(
            "grpc worker service needs grpcio, which is not installed. Install it with: "
            + install_hint("wove-executor-grpc")
        ) from exc
    if (certfile is None) != (keyfile is None):
        raise ValueError("TLS needs both certfile and keyfile (got only one of them).")
    if client_ca is not None and certfile is None:
        raise ValueError("client_ca (mTLS) needs certfile and keyfile: client certificates are checked over TLS only.")
    defaults = _server_options(
        max_message_bytes, handshake_timeout=handshake_timeout, idle_timeout=idle_timeout,
        keepalive_interval=keepalive_interval, keepalive_timeout=keepalive_timeout,
        max_connection_age=max_connection_age, max_connection_age_grace=max_connection_age_grace,
    )
    service = GrpcWorkerService(engine, security=security, allow_remote_shutdown=allow_remote_shutdown,
                                max_message_bytes=max_message_bytes, max_runs_per_session=max_runs_per_session,
                                metrics=metrics)
    merged = dict(defaults)
    merged.update(options or [])  # a caller's option replaces the default of the same name
    server = grpc.aio.server(options=list(merged.items()))
    server.add_generic_rpc_handlers(service.handlers())
    try:
        from grpc_health.v1 import health_pb2_grpc
    except ImportError as exc:  # pragma: no cover - grpcio-health-checking is a dependency
        raise ImportError("grpc worker service needs grpcio-health-checking, which is not installed. Install it "
                          f"with: {install_hint('wove-executor-grpc')}") from exc
    health = await _health_servicer(service.worker)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if certfile is not None:
        chain = read_pem(certfile, "the certificate (--certfile)")
        key = read_pem(keyfile, "the private key (--keyfile)")
        ca = read_pem(client_ca, "the client CA (--client-ca)")
        credentials = grpc.ssl_server_credentials(
            [(key, chain)], root_certificates=ca, require_client_auth=ca is not None
        )
        bound = server.add_secure_port(address, credentials)
    else:
        bound = server.add_insecure_port(address)
    if not bound:
        raise ValueError(f"gRPC worker service could not bind {address}: the port is in use or the host is not local.")
    await server.start()
    logger.debug("grpc worker service listening on %s (tls=%s)", address, certfile is not None)
    return GrpcWorkerServer(server, service, host, bound, tls=certfile is not None, health=health)


@contextlib.asynccontextmanager
async def serve(engine: WorkerEngine | None = None, *, grace: float = 5.0, **kwargs: Any) -> AsyncIterator[int]:
    """Run a worker service for the ``async with`` block and yield its bound port.

    Takes the arguments of :func:`start_server`; stops with ``grace`` seconds on exit.
    """
    running = await start_server(engine, **kwargs)
    try:
        yield running.port
    finally:
        await running.stop(grace)


#: start_server's connection timeouts that ``wove worker grpc`` has flags for (plugin.py).
CLI_TIMEOUTS = ("handshake_timeout", "idle_timeout", "keepalive_interval", "keepalive_timeout",
                "max_connection_age", "max_connection_age_grace")


def run(args: argparse.Namespace) -> int:
    """``wove worker grpc``: serve until SIGINT/SIGTERM, then drain (:mod:`wove.serve`)."""
    from wove.serve import run_service

    running: list[GrpcWorkerServer] = []
    metrics_port = getattr(args, "metrics_port", None)
    metrics: Any = None
    if metrics_port is not None:
        from wove.metrics import ServiceMetrics

        metrics = ServiceMetrics("grpc")  # before the loop: the metrics port is bound before the ready line

    async def start() -> str:
        server = await start_server(
            WorkerEngine(max_concurrency=args.max_concurrency, name="grpc"),
            host=args.host,
            port=args.port,
            security=args.security,
            certfile=getattr(args, "certfile", None),
            keyfile=getattr(args, "keyfile", None),
            client_ca=getattr(args, "client_ca", None),
            max_message_bytes=args.max_body_bytes,
            allow_remote_shutdown=getattr(args, "allow_remote_shutdown", False),
            max_runs_per_session=getattr(args, "max_runs_per_session", 10_000),
            metrics=metrics or False,
            **{name: getattr(args, name) for name in CLI_TIMEOUTS if hasattr(args, name)},
        )
        running.append(server)
        return server.target

    async def stop(grace: float) -> None:
        for server in running:
            await server.stop(grace)

    return run_service("grpc", start, stop, grace=getattr(args, "grace", 10.0), service=metrics,
                       metrics_port=metrics_port, metrics_host=getattr(args, "metrics_host", None))


#: The runner's former name.
run_cli = run
