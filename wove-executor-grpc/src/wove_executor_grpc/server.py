"""The reference gRPC worker service: a grpc.aio server over :class:`wove.worker.WorkerEngine`.

No generated stubs: raw-bytes generic handlers serve two methods of the service
``wove.network_executor.WorkerService``:

* ``Send`` (unary-unary, the Wove 2.x method): the request is one JSON command; the
  response is ``{"events": [...]}`` holding the run's events and ending with its
  terminal event (heartbeats are left out: they only matter while the run is live).
  ``cancel_task`` and ``shutdown`` answer at once with ``{"events": []}``.
* ``Stream`` (unary-stream, a Wove extension): the request is one JSON command; every
  response message is one JSON event, sent as it happens (``task_started``,
  ``heartbeat``, then the terminal event).

Request metadata is verified (signed or bearer, see :mod:`wove.security`) before the
request is decoded: missing credentials → ``UNAUTHENTICATED``, wrong, replayed or expired
ones → ``PERMISSION_DENIED``; a command that does not decode → ``INVALID_ARGUMENT``.
Nothing is unpickled or executed for a rejected request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wove.errors import ProtocolError
from wove.protocol import TERMINAL_EVENTS, decode_command, encode_event, parse_json
from wove.security import MissingCredentialsError, NetworkExecutorSecurity
from wove.worker import WorkerEngine

from ._pem import read_pem

if TYPE_CHECKING:
    import argparse

    import grpc

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_KEEPALIVE_INTERVAL",
    "DEFAULT_KEEPALIVE_TIMEOUT",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "SEND_METHOD",
    "SERVICE",
    "SESSION_CONFIRMATION",
    "SESSION_METHOD",
    "STREAM_METHOD",
    "GrpcWorkerServer",
    "GrpcWorkerService",
    "serve",
    "start_server",
]

logger = logging.getLogger(__name__)

SERVICE = "wove.network_executor.WorkerService"
SEND_METHOD = f"/{SERVICE}/Send"
STREAM_METHOD = f"/{SERVICE}/Stream"
SESSION_METHOD = f"/{SERVICE}/Session"
#: Largest request (and response) message, in bytes.
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
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
_EMPTY_REPLY = b'{"events":[]}'


class _Closing(Exception):
    """The service stops while a run waits for its terminal event."""


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
    """The Send/Stream handlers over one :class:`WorkerEngine`.

    Args:
        engine: the worker engine (a new one with default limits when omitted).
        security: verifies request metadata; ``None`` accepts unauthenticated requests.
        send_method / stream_method: full method paths served.
        allow_remote_shutdown: obey a client's ``shutdown`` command (off: a service
            shared by many clients must not be stopped by one of them).
    """

    def __init__(
        self,
        engine: WorkerEngine | None = None,
        *,
        security: NetworkExecutorSecurity | None = None,
        send_method: str = SEND_METHOD,
        stream_method: str = STREAM_METHOD,
        session_method: str | None = SESSION_METHOD,
        allow_remote_shutdown: bool = False,
    ) -> None:
        self.engine = engine if engine is not None else WorkerEngine(name="grpc")
        self.security = security if security is not None else NetworkExecutorSecurity()
        self.send_method = send_method
        self.stream_method = stream_method
        self.session_method = session_method
        self.allow_remote_shutdown = allow_remote_shutdown
        self._waiting: set[Callable[[], None]] = set()

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        """Generic handlers to pass to ``server.add_generic_rpc_handlers``."""
        import grpc

        def handler(path: str) -> tuple[str, str]:
            service, method = path.lstrip("/").rsplit("/", 1)
            return service, method

        by_service: dict[str, dict[str, grpc.RpcMethodHandler]] = {}
        service, method = handler(self.send_method)
        by_service.setdefault(service, {})[method] = grpc.unary_unary_rpc_method_handler(self._send)
        service, method = handler(self.stream_method)
        by_service.setdefault(service, {})[method] = grpc.unary_stream_rpc_method_handler(self._stream)
        if self.session_method:
            service, method = handler(self.session_method)
            by_service.setdefault(service, {})[method] = grpc.stream_stream_rpc_method_handler(self._session)
        return [grpc.method_handlers_generic_handler(name, methods) for name, methods in by_service.items()]

    async def close(self, grace: float = 5.0) -> None:
        """Shut the engine down (runs end by orphan policy) and release waiting calls.

        Calls still waiting after the engine stopped (runs with orphan policy
        ``requeue``) end with ``UNAVAILABLE`` so their clients deliver them again.
        """
        await self.engine.shutdown(grace=grace)
        for closer in list(self._waiting):
            closer()

    # -- request checks ---------------------------------------------------------
    async def _admit(self, request: bytes, context: grpc.aio.ServicerContext, method: str) -> dict[str, Any]:
        """Verify the metadata, then decode the command (aborting the call on failure)."""
        import grpc

        await self._authorize(request, context, method)
        try:
            return decode_command(request)
        except ProtocolError as exc:
            run = getattr(exc, "run_id", None)
            where = f" for run {run}" if run else ""
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Malformed Wove command{where}: {exc}")
            raise  # unreachable: abort raises

    async def _authorize(self, request: bytes, context: grpc.aio.ServicerContext, method: str) -> None:
        """Verify the call's metadata: UNAUTHENTICATED / PERMISSION_DENIED abort the call."""
        import grpc

        if self.security.mode != "none":
            metadata = tuple(context.invocation_metadata() or ())
            try:
                self.security.verify_metadata(metadata=metadata, transport="grpc", target=method, body=request)
            except MissingCredentialsError as exc:
                # the fact only: the client adds the one fix (a Wove 2.x client shows this as is)
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
            except PermissionError as exc:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"Request rejected: {exc}")

    async def _control(self, frame: dict[str, Any]) -> None:
        if frame["type"] == "cancel_task":
            self.engine.cancel(str(frame.get("run_id")))
        elif self.allow_remote_shutdown:
            await self.engine.submit(frame, lambda _event: None)
        else:
            logger.info("grpc worker: ignoring a client's shutdown command (allow_remote_shutdown is off)")

    def _release(self, frame: dict[str, Any], finished: bool) -> None:
        """A call ended before its run did (client cancelled or disconnected)."""
        if finished:
            return
        policy = (frame.get("delivery") or {}).get("delivery_orphan_policy")
        if policy != "detach":
            self.engine.cancel(str(frame["run_id"]))

    # -- handlers ---------------------------------------------------------------
    async def _send(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        frame = await self._admit(request, context, self.send_method)
        if frame["type"] != "run_task":
            await self._control(frame)
            return _EMPTY_REPLY
        encoded: list[bytes] = []
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def sink(event: dict[str, Any]) -> None:
            kind = event.get("type")
            if kind == "heartbeat":
                return
            encoded.append(encode_event(event))
            if kind in TERMINAL_EVENTS and not done.done():
                done.set_result(None)

        def closer() -> None:
            if not done.done():
                done.set_exception(_Closing())

        self._waiting.add(closer)
        try:
            await self.engine.submit(frame, sink)
            await done
        except _Closing:
            await self._abort_closing(context, frame)
        finally:
            self._waiting.discard(closer)
            self._release(frame, done.done() and done.exception() is None)
        return b'{"events":[' + b",".join(encoded) + b"]}"

    async def _stream(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        frame = await self._admit(request, context, self.stream_method)
        if frame["type"] != "run_task":
            await self._control(frame)
            return
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

        def closer() -> None:
            queue.put_nowait(None)

        finished = False
        self._waiting.add(closer)
        try:
            await self.engine.submit(frame, queue.put_nowait)
            while not finished:
                event = await queue.get()
                if event is None:
                    raise _Closing
                finished = event.get("type") in TERMINAL_EVENTS
                yield encode_event(event)
        except _Closing:
            await self._abort_closing(context, frame)
        finally:
            self._waiting.discard(closer)
            self._release(frame, finished)

    async def _session(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """Session extension (bidirectional): many commands and events on one call.

        Authenticated once, at call start (signed over the method path and an empty
        body, like a WebSocket handshake); then the server confirms the method with the
        initial metadata :data:`SESSION_CONFIRMATION` before it reads any command. Each
        request message is one command or a JSON list of commands; each response message
        is ``{"events": [...]}`` with the events that were ready. A command that does not
        decode is answered with a ``task_error`` (or a ``log``) on the session; nothing
        runs for it.

        Drain (:meth:`close`): the engine ends every run by its orphan policy (``detach``
        runs finish within the grace, then are cancelled with ``task_cancelled``); the
        session keeps sending every event until each of its runs has its terminal event,
        then ends the call with OK. Runs the engine dropped for re-delivery (``requeue``)
        have none: the call then ends with ``UNAVAILABLE`` naming them, after all the
        other events, so their client delivers them again elsewhere.
        """
        assert self.session_method is not None
        await self._authorize(b"", context, self.session_method)
        await context.send_initial_metadata(SESSION_CONFIRMATION)
        out: asyncio.Queue[bytes | None] = asyncio.Queue()
        live: dict[str, tuple[str, str | None]] = {}  # run_id -> (task_id, orphan policy)
        closing: list[bool] = []
        ended: list[BaseException | None] = []

        def sink(event: dict[str, Any]) -> None:
            if event.get("type") in TERMINAL_EVENTS:
                live.pop(str(event.get("run_id")), None)
            out.put_nowait(encode_event(event))

        async def read() -> None:
            try:
                async for message in requests:
                    try:
                        parsed = parse_json(message)
                    except ProtocolError as exc:
                        self.engine.reject(exc, sink)
                        continue
                    for command in parsed if isinstance(parsed, list) else [parsed]:
                        try:
                            frame = decode_command(command)
                        except ProtocolError as exc:
                            self.engine.reject(exc, sink)
                            continue
                        if frame["type"] == "run_task":
                            policy = (frame.get("delivery") or {}).get("delivery_orphan_policy")
                            live[frame["run_id"]] = (str(frame.get("task_id")), policy)
                            await self.engine.submit(frame, sink)
                        else:
                            await self._control(frame)
            except Exception as exc:
                ended.append(exc)
            finally:
                ended.append(None)
                out.put_nowait(None)  # the client finished sending

        def closer() -> None:
            # called once the engine has shut down: every terminal event it will send is queued
            closing.append(True)
            out.put_nowait(None)

        reader = asyncio.get_running_loop().create_task(read())
        self._waiting.add(closer)
        try:
            while True:
                item = await out.get()
                batch = [] if item is None else [item]
                while not out.empty():
                    more = out.get_nowait()
                    if more is not None:
                        batch.append(more)
                if batch:
                    yield b'{"events":[' + b",".join(batch) + b"]}"
                if not out.empty():
                    continue  # events queued while that batch was written go first
                if closing:
                    self._end_leftovers(live, sink)
                    if not out.empty():
                        continue
                    if live:
                        await self._abort_closing(context, {"run_id": ", ".join(live)})
                    return
                if ended and not live:
                    if ended[0] is not None:
                        raise ended[0]
                    return
        finally:
            self._waiting.discard(closer)
            reader.cancel()
            for run_id, (_task_id, policy) in list(live.items()):
                if policy != "detach":
                    self.engine.cancel(run_id)

    def _end_leftovers(self, live: dict[str, tuple[str, str | None]], sink: Callable[[dict[str, Any]], None]) -> None:
        """After the engine shut down: a run still without its terminal event gets one.

        ``requeue`` runs are left for the client to deliver again. Any other run (one
        that was admitted while the engine was shutting down) is cancelled now, with
        ``task_cancelled``.
        """
        for run_id, (task_id, policy) in list(live.items()):
            if policy == "requeue":
                continue
            if not self.engine.cancel(run_id):  # the engine reports task_cancelled itself
                sink({"type": "task_cancelled", "run_id": run_id, "task_id": task_id})

    @staticmethod
    async def _abort_closing(context: grpc.aio.ServicerContext, frame: dict[str, Any]) -> None:
        import grpc

        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            f"The worker service is shutting down; run {frame.get('run_id')} did not finish here.",
        )


@dataclass(eq=False)
class GrpcWorkerServer:
    """A running server: its bound ``port``, ``host`` and the service it serves."""

    server: Any
    service: GrpcWorkerService
    host: str
    port: int
    tls: bool
    _stopped: bool = field(default=False, repr=False)

    @property
    def target(self) -> str:
        """``host:port`` to put in ``executor_config.target``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    async def stop(self, grace: float = 5.0) -> None:
        """Stop gracefully: runs end by orphan policy within ``grace`` seconds, then the
        server stops (remaining calls are cancelled)."""
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
    handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
    keepalive_interval: float | None = DEFAULT_KEEPALIVE_INTERVAL,
    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT,
    max_connection_age: float | None = None,
    max_connection_age_grace: float | None = None,
) -> GrpcWorkerServer:
    """Start a grpc.aio worker service on the running loop.

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

    Raises:
        ImportError: grpcio is not installed.
        ValueError: only one of certfile/keyfile, a client CA without TLS, an unreadable
            file, a timeout that is not a positive number, or the address cannot be bound.
    """
    try:
        import grpc
    except ImportError as exc:  # pragma: no cover - grpcio is a dependency
        raise ImportError(
            "grpc worker service needs grpcio, which is not installed. Install it with: pip install wove-executor-grpc"
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
    verifier = NetworkExecutorSecurity.from_config(security).resolve()
    service = GrpcWorkerService(engine, security=verifier, allow_remote_shutdown=allow_remote_shutdown)
    merged = dict(defaults)
    merged.update(options or [])  # a caller's option replaces the default of the same name
    server = grpc.aio.server(options=list(merged.items()))
    server.add_generic_rpc_handlers(service.handlers())
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
    return GrpcWorkerServer(server, service, host, bound, tls=certfile is not None)


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


_CLI_TIMEOUTS = ("handshake_timeout", "idle_timeout", "keepalive_interval", "keepalive_timeout",
                 "max_connection_age", "max_connection_age_grace")


async def _serve_cli(args: argparse.Namespace) -> int:
    from wove.cli import announce_listening

    engine = WorkerEngine(max_concurrency=args.max_concurrency, name="grpc")
    running = await start_server(
        engine,
        host=args.host,
        port=args.port,
        security=args.security,
        certfile=args.certfile,
        keyfile=args.keyfile,
        client_ca=args.client_ca,
        max_message_bytes=args.max_body_bytes,
        # connection timeouts, when the CLI offers flags for them (start_server documents them)
        **{name: getattr(args, name) for name in _CLI_TIMEOUTS if getattr(args, name, None) is not None},
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    announce_listening(running.target)
    try:
        await stop.wait()
    finally:
        await running.stop(args.grace)
    return 0


def run_cli(args: argparse.Namespace) -> int:
    """``wove worker grpc``: serve until SIGINT/SIGTERM, then stop gracefully."""
    try:
        return asyncio.run(_serve_cli(args))
    except KeyboardInterrupt:
        return 0
