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
    "DEFAULT_MAX_MESSAGE_BYTES",
    "SEND_METHOD",
    "SERVICE",
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
_EMPTY_REPLY = b'{"events":[]}'


class _Closing(Exception):
    """The service stops while a run waits for its terminal event."""


def _server_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # clients keep long calls alive with pings (the executor pings every 30 s)
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 0),
    ]


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
                await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                    f"{exc} Configure executor_config.security with this worker's secret.")
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
        body, like a WebSocket handshake). Each request message is one command or a
        JSON list of commands; each response message is ``{"events": [...]}`` with the
        events that were ready. A command that does not decode is answered with a
        ``task_error`` (or a ``log``) on the session; nothing runs for it.
        """
        assert self.session_method is not None
        await self._authorize(b"", context, self.session_method)
        out: asyncio.Queue[bytes | None] = asyncio.Queue()
        live: dict[str, str | None] = {}
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
                            live[frame["run_id"]] = (frame.get("delivery") or {}).get("delivery_orphan_policy")
                            await self.engine.submit(frame, sink)
                        else:
                            await self._control(frame)
            except Exception as exc:
                ended.append(exc)
            finally:
                ended.append(None)
                out.put_nowait(None)  # the client finished sending

        def closer() -> None:
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
                if closing:
                    await self._abort_closing(context, {"run_id": ", ".join(live) or "-"})
                if ended and not live and out.empty():
                    if ended[0] is not None:
                        raise ended[0]
                    return
        finally:
            self._waiting.discard(closer)
            reader.cancel()
            for run_id, policy in list(live.items()):
                if policy != "detach":
                    self.engine.cancel(run_id)

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
        options: extra grpc server options (appended after the defaults).
        allow_remote_shutdown: obey a client's ``shutdown`` command.

    Raises:
        ImportError: grpcio is not installed.
        ValueError: only one of certfile/keyfile, a client CA without TLS, an unreadable
            file, or the address cannot be bound.
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
    verifier = NetworkExecutorSecurity.from_config(security).resolve()
    service = GrpcWorkerService(engine, security=verifier, allow_remote_shutdown=allow_remote_shutdown)
    server = grpc.aio.server(options=[*_server_options(max_message_bytes), *(options or [])])
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
