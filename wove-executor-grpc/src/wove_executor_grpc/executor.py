"""GrpcEnvironmentExecutor: Wove frames over a grpc.aio channel, no generated stubs.

One channel per environment. Three generic methods, all raw bytes (JSON frames, or binary
frames with a worker that announced ``binary_frames``):

* ``Send`` (unary, the Wove 2.x wire): one command in, its events out when the run ends.
* ``Stream`` (server-streaming extension): one command in, each event out as it happens
  (``task_started``, heartbeats, the terminal event).
* ``Session`` (bidirectional extension): one long call per environment carrying many
  runs; commands queued together travel as one message, events come back as they happen.

With ``streaming: "auto"`` (the default) the environment uses ``Session``; a server that
answers ``UNIMPLEMENTED`` (a Wove 2.x-style server) is remembered and the environment
falls back to ``Stream`` for runs with heartbeats and ``Send`` for the rest.

Binary frames (``wove.protocol``, docs/wire.md): the Session confirmation metadata
``wove-capabilities`` names ``binary_frames``; from then (and with ``executor_config.binary_frames``
true, the default) commands with bulky data are binary frames (:func:`wove.framing.worth_binary`;
small ones stay JSON), several back to back in one message. Runs
over ``Send``/``Stream`` learn the capabilities from a Session call too: before the first
run the executor opens one, reads its confirmation and closes it without writing; a server
without Session (Wove 2.x) answers ``UNIMPLEMENTED`` and keeps getting JSON. Events of either
kind are decoded at any time.

``grpc`` is imported in :meth:`GrpcEnvironmentExecutor.start`, never at import time.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

from wove.errors import ConfigError, DispatchError, ProtocolError
from wove.framing import ChunkAssembler, capability_names, chunks, worth_binary
from wove.options import (
    ANY,
    INVALID,
    PAYLOAD_OPTIONS,
    POSITIVE_SECONDS,
    REDELIVERY_OPTIONS,
    Kind,
    Option,
    OptionSpec,
    one_of,
)
from wove.protocol import (
    CAPABILITY_BINARY_CHUNKS,
    CAPABILITY_BINARY_FRAMES,
    decode_events,
    encode_binary_parts,
    encode_frame,
    is_binary,
    transport_error_event,
)
from wove.registry import install_hint
from wove.security import NetworkExecutorSecurity, ensure_secure_target, is_local_grpc_target
from wove.tls import INSECURE_OPTION, TLS_OPTIONS, pem_credentials, tls_settings
from wove.transport import DEFAULT_RECONNECT_TIMEOUT, FrameExecutor, InFlight, PayloadPolicy

from .chunking import CHUNK_BYTES, CHUNKED_ABOVE, Parts

if TYPE_CHECKING:
    from ._h2 import NativeUnaryClient, _Stream

#: the metadata that tells a worker this client reads binary frames (docs/wire.md)
_READS_BINARY = ("wove-capabilities", CAPABILITY_BINARY_FRAMES)
#: on a Session: binary frames, and large ones in chunks (``binary_chunks``)
_READS_CHUNKS = ("wove-capabilities", f"{CAPABILITY_BINARY_FRAMES}, {CAPABILITY_BINARY_CHUNKS}")
#: an encoded command: bytes, or a large binary frame kept in parts (for a Session that reads chunks)
_Body = bytes | Parts

__all__ = ["DEFAULT_CHANNEL_OPTIONS", "ERROR_TABLE", "GRPC_OPTIONS", "GrpcEnvironmentExecutor", "describe_rpc_error"]

logger = logging.getLogger(__name__)

DEFAULT_SEND_METHOD = "/wove.network_executor.WorkerService/Send"
DEFAULT_STREAM_METHOD = "/wove.network_executor.WorkerService/Stream"
DEFAULT_SESSION_METHOD = "/wove.network_executor.WorkerService/Session"
#: Largest batch of commands written as one Session message.
_BATCH_BYTES = 4 * 1024 * 1024
_MAX_MESSAGE = 256 * 1024 * 1024
_SEND_LIMIT = "grpc.max_send_message_length"
_GRPC_MAX_LENGTH = 2**31 - 1
_RECEIVE_LIMIT = "grpc.max_receive_message_length"
#: Channel options applied before ``executor_config.options`` (which override them). The two
#: message limits follow ``executor_config.max_message_bytes`` (default 256 MiB) unless
#: ``options`` names them.
DEFAULT_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    (_SEND_LIMIT, _MAX_MESSAGE),
    (_RECEIVE_LIMIT, _MAX_MESSAGE),
    # long unary calls (a task running for minutes) keep their connection proven alive
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
)
#: Seconds a cancel_task call may take.
CANCEL_TIMEOUT = 10.0
#: Initial metadata by which a server confirms it serves Session (before it reads a command).
SESSION_CONFIRMATION_KEY = "wove-session"
#: Initial metadata of the Session confirmation naming the worker's capabilities (comma-separated).
CAPABILITIES_KEY = "wove-capabilities"
#: Seconds the Session writer waits for that confirmation before it writes anyway (a
#: server that sends its initial metadata only with its first message).
SESSION_CONFIRM_TIMEOUT = 5.0
#: Seconds a run_task waits for the worker's answer (its capabilities) before it is encoded.
_ANSWER_WAIT = SESSION_CONFIRM_TIMEOUT + 2.0
#: Seconds to wait for the status of a call whose initial metadata came without the
#: confirmation (an answer such as UNIMPLEMENTED comes with empty initial metadata).
_STATUS_WAIT = 1.0
#: Seconds a re-delivery waits for an UNAVAILABLE channel to be ready again
#: (executor_config.reconnect_timeout, the policy every transport shares; alias ready_timeout).
DEFAULT_READY_TIMEOUT = DEFAULT_RECONNECT_TIMEOUT
_MISSING_GRPC = (
    f"grpc executor needs grpcio, which is not installed. Install it with: {install_hint('wove-executor-grpc')}"
)


def _method_path(value: Any) -> Any:
    if not isinstance(value, str) or not value.startswith("/") or value.count("/") < 2:
        return INVALID
    return value


def _target(value: Any) -> Any:
    return value if isinstance(value, str) and value.strip() else INVALID


def _metadata(value: Any) -> Any:
    pairs: Iterable[Any] = value.items() if isinstance(value, dict) else value
    if isinstance(value, (str, bytes)):
        return INVALID
    try:
        return tuple((str(k).lower(), str(v)) for k, v in pairs)
    except (TypeError, ValueError):
        return INVALID


def _option_items(value: Any) -> dict[str, Any]:
    """The channel options the user named in ``executor_config.options`` (already validated)."""
    if value is None or isinstance(value, (str, bytes)):
        return {}
    items = value.items() if isinstance(value, dict) else value
    return {str(k): v for k, v in items}


def _announced(metadata: Any) -> frozenset[str]:
    """The capabilities in a Session confirmation (``wove-capabilities``, comma-separated)."""
    return capability_names(metadata.get(CAPABILITIES_KEY))


def _channel_options(value: Any) -> Any:
    """DEFAULT_CHANNEL_OPTIONS updated with ``value`` (a dict or (name, value) pairs)."""
    items = value.items() if isinstance(value, dict) else value
    if isinstance(value, (str, bytes)):
        return INVALID
    merged = dict(DEFAULT_CHANNEL_OPTIONS)
    try:
        merged.update((str(k), v) for k, v in items)
    except (TypeError, ValueError):
        return INVALID
    return tuple(merged.items())


_METHOD = Kind(f"a full gRPC method path like '{DEFAULT_SEND_METHOD}'", _method_path)

#: The grpc executor's ``executor_config`` keys (see :mod:`wove.options`; the TLS keys
#: are :data:`wove.tls.TLS_OPTIONS`, shared with http and websocket: ``secure``,
#: ``root_certificates``, ``certificate_chain`` and ``private_key`` are their older spellings).
GRPC_OPTIONS = OptionSpec("grpc", [
    Option("target", Kind("a gRPC target such as '127.0.0.1:50051'", _target), required=True,
           doc="host:port (or any gRPC target) of the worker service"),
    Option("method", _METHOD, DEFAULT_SEND_METHOD, "unary method (the Wove 2.x wire)"),
    Option("stream_method", _METHOD, DEFAULT_STREAM_METHOD, "server-streaming method (events as they happen)"),
    Option("session_method", _METHOD, DEFAULT_SESSION_METHOD, "bidirectional method (one call per environment)"),
    Option("streaming", one_of("auto", "session", True, False), "auto",
           "'auto' (Session, falling back to Stream/Send), 'session', true (Stream), false (Send)"),
    Option("metadata", Kind("a dict or a list of (key, value) pairs", _metadata), doc="extra call metadata"),
    Option("security", ANY, doc="request signing: 'env:VAR', {'type': 'signed'|'bearer', ...} or 'none'"),
    Option("timeout", POSITIVE_SECONDS, doc="deadline of each call in seconds (default: none)"),
    INSECURE_OPTION,
    Option("unary_client", one_of("auto", "native", "grpcio"), "auto",
           "client of the unary Send calls: 'auto' (the native HTTP/2 client for a plaintext host:port "
           "target without user channel options, else grpcio), 'native' (always; an error where it cannot "
           "be used), 'grpcio'"),
    Option("options", Kind("a dict or (name, value) pairs of gRPC channel options", _channel_options),
           DEFAULT_CHANNEL_OPTIONS, "gRPC channel options, over DEFAULT_CHANNEL_OPTIONS"),
    TLS_OPTIONS,
    REDELIVERY_OPTIONS,
    PAYLOAD_OPTIONS,
])


class _BadResponse(Exception):
    """The server answered with something that is not Wove events."""


class _Session:
    """One bidirectional Session call carrying many runs."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.bodies: dict[str, _Body] = {}  # run_id -> encoded run_task, until its terminal event
        self.pending: list[tuple[dict[str, Any], _Body]] = []  # (frame, encoded frame) to write
        self.wake = asyncio.Event()
        self.received = False
        #: the server confirmed it serves Session (SESSION_CONFIRMATION metadata or a message)
        self.confirmed = False
        self.tasks: list[asyncio.Task[None]] = []
        #: what the server's answer announced (``wove-capabilities`` metadata); set once answered
        self.answered: asyncio.Future[frozenset[str]] = asyncio.get_running_loop().create_future()

    def answer(self, capabilities: frozenset[str]) -> None:
        if not self.answered.done():
            self.answered.set_result(capabilities)

    def chunked(self) -> bool:
        """The worker announced ``binary_chunks`` (it reads a large binary frame in chunks)."""
        return self.answered.done() and CAPABILITY_BINARY_CHUNKS in self.answered.result()

    def put(self, frame: dict[str, Any], body: _Body) -> None:
        self.pending.append((frame, body))
        self.wake.set()


class GrpcEnvironmentExecutor(FrameExecutor):
    """Send Wove frames to a gRPC worker service (see the module docstring).

    ``executor_config`` keys: :data:`GRPC_OPTIONS` (``target``, required, ``host:port``;
    ``method``, ``stream_method``, ``session_method``, ``streaming``, ``metadata``,
    ``security``, ``timeout``, ``insecure``, ``options``), the TLS keys of
    :data:`wove.tls.TLS_OPTIONS` (``tls``, ``ca_file``, ``cert_file``, ``key_file``,
    ``server_hostname``; older spellings ``secure``, ``root_certificates``,
    ``certificate_chain``, ``private_key``), the re-delivery keys and the payload keys
    (``binary_frames``, ``max_message_bytes``, ``payload_warning_bytes``). An unknown key is
    a :class:`~wove.errors.ConfigError` at start, with a did-you-mean.
    """

    executor_name = "grpc"
    config_options = GRPC_OPTIONS

    def __init__(self) -> None:
        super().__init__()
        self._grpc: Any = None
        self._channel: Any = None
        self._unary: Any = None
        self._native: NativeUnaryClient | None = None
        self._stream: Any = None
        self._target = ""
        self._method = DEFAULT_SEND_METHOD
        self._stream_method = DEFAULT_STREAM_METHOD
        self._session_method = DEFAULT_SESSION_METHOD
        self._streaming: bool | str = "auto"
        self._session: _Session | None = None
        self._session_rpc: Any = None
        self._timeout: float | None = None
        self._tls = False
        self._ready_timeout = DEFAULT_READY_TIMEOUT
        self._metadata: tuple[tuple[str, str], ...] = ()
        self._security = NetworkExecutorSecurity()
        #: each run's call: its _deliver task, or a native call answered in a callback
        self._calls: dict[str, asyncio.Task[None] | _NativeCall] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._ready_waiter: asyncio.Task[bool] | None = None
        #: executor_config.binary_frames
        self._binary_frames = True
        #: the worker announced binary_frames (True), did not (False), not known yet (None)
        self._binary: bool | None = None
        self._probe: asyncio.Task[None] | None = None
        #: largest message (and chunked frame) accepted from the worker; None: no limit
        self._receive_limit: int | None = _MAX_MESSAGE

    # -- lifecycle --------------------------------------------------------------
    async def start(
        self,
        *,
        environment_name: str,
        environment_config: dict[str, Any],
        run_config: dict[str, Any],
    ) -> None:
        """Validate the config and open the channel (connection is lazy).

        Raises:
            ImportError: grpcio is not installed.
            ConfigError: an unknown key (with a did-you-mean), a bad value or TLS keys
                that contradict each other (the message names the key and the fix); a
                non-local target without TLS or security.
            RuntimeError: a security environment variable is unset.
        """
        try:
            import grpc
            import grpc.aio
        except ImportError as exc:
            raise ImportError(_MISSING_GRPC) from exc
        config = GRPC_OPTIONS.validate(environment_config, environment=environment_name)
        target = config["target"]
        tls = tls_settings(config, executor="grpc", environment=environment_name)
        self._method = config["method"]
        self._stream_method = config["stream_method"]
        self._session_method = config["session_method"]
        streaming = config["streaming"]
        self._timeout = None if config["timeout"] is None else float(config["timeout"])
        self._metadata = config["metadata"] or ()
        security = NetworkExecutorSecurity.from_config(config["security"]).resolve()
        root, key, chain = pem_credentials(tls) if tls.enabled else (None, None, None)
        secure = tls.enabled
        ensure_secure_target(
            environment=environment_name, executor="grpc", target=target, local=is_local_grpc_target(target),
            tls=secure, security=security, insecure=config["insecure"],
        )
        merged = dict(config["options"])
        named = _option_items(environment_config.get("options"))
        max_bytes = int(config["max_message_bytes"])
        for name in (_SEND_LIMIT, _RECEIVE_LIMIT):
            if name not in named:  # both directions follow max_message_bytes (grpc takes an int32)
                merged[name] = min(max_bytes, _GRPC_MAX_LENGTH)
        options = list(merged.items())
        receive = merged.get(_RECEIVE_LIMIT)
        self._receive_limit = receive if isinstance(receive, int) and receive >= 0 else None
        if tls.server_hostname:
            options.append(("grpc.ssl_target_name_override", tls.server_hostname))
        self._open_events(environment_name, environment_config)
        send_limit = named.get(_SEND_LIMIT)
        if (isinstance(send_limit, int) and not isinstance(send_limit, bool) and send_limit >= 0
                and ("max_message_bytes" not in environment_config or send_limit < max_bytes)):
            # the user's grpc limit is the one that refuses a command: the error names it
            self._payload = PayloadPolicy.from_config(config, setting=f"executor_config.options {_SEND_LIMIT}",
                                                      max_bytes=send_limit)
        else:
            self._payload = PayloadPolicy.from_config(config)
        self._binary_frames = bool(config["binary_frames"])
        self._binary = None if self._binary_frames else False
        # wait for UNAVAILABLE channels per the shared policy (ready_timeout is its alias)
        self._ready_timeout = self._redelivery.reconnect_timeout
        self._grpc = grpc
        self._target = target
        self._streaming = streaming
        self._security = security
        self._tls = secure
        if secure:
            credentials = grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=chain)
            self._channel = grpc.aio.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        self._unary = self._channel.unary_unary(self._method)
        self._native = self._native_client(config, environment_name, named, merged.get(_SEND_LIMIT))
        if self._native is not None:
            self._unary = self._native
        self._stream = self._channel.unary_stream(self._stream_method)
        self._session_rpc = self._channel.stream_stream(self._session_method)
        self._session = None
        self._calls = {}
        logger.debug("environment=%s: grpc channel to %s (tls=%s, streaming=%s)", environment_name, target, secure, streaming)

    async def stop(self) -> None:
        """Cancel the calls in flight and close the channel."""
        session, self._session = self._session, None
        if session is not None:
            session.call.cancel()
            session.answer(frozenset())  # a send waiting for the answer goes on (and finds us stopped)
        tasks = [*self._calls.values(), *self._background, *(session.tasks if session else ())]
        if self._ready_waiter is not None:
            tasks.append(self._ready_waiter)  # type: ignore[arg-type]
        if self._probe is not None:
            tasks.append(self._probe)
            self._probe = None
        for task in tasks:
            task.cancel()
        tasks = [task for task in tasks if isinstance(task, asyncio.Future)]  # (a _NativeCall has ended)
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        self._calls.clear()
        self._background.clear()
        self._ready_waiter = None
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close(grace=None)
        if self._native is not None:
            native, self._native = self._native, None
            await native.close()
        self._unary = self._stream = self._session_rpc = None

    def _native_client(self, config: dict[str, Any], environment: str, named: dict[str, Any],
                       send_limit: Any) -> NativeUnaryClient | None:
        """The native HTTP/2 client of the Send calls (executor_config.unary_client), or None."""
        choice = config["unary_client"]
        if choice == "grpcio":
            return None
        address = _host_port(self._target)
        reason = ("TLS" if self._tls else "executor_config.options" if named
                  else None if address else f"the target {self._target!r} (not host:port)")
        if reason is not None:
            if choice == "native":
                raise ConfigError(f"environment {environment!r}: executor_config.unary_client 'native' cannot "
                                  f"serve {reason}; set unary_client to 'auto' or 'grpcio'")
            return None
        assert address is not None
        from ._h2 import NativeUnaryClient  # imports grpc (as start does)

        return NativeUnaryClient(address[0], address[1], self._method,
                                 max_send=send_limit if isinstance(send_limit, int) else None,
                                 max_receive=self._receive_limit)

    # -- commands ----------------------------------------------------------------
    async def send(self, frame: dict[str, Any]) -> None:
        """Transmit one command (returns once the call is under way).

        Raises:
            RuntimeError: not started.
            ValueError: an unknown command type.
            DispatchError: the callable or arguments cannot be pickled.
            PayloadTooLargeError: the encoded run_task is over ``max_message_bytes`` (or the
                ``grpc.max_send_message_length`` set in ``options``); nothing was sent.
        """
        self._require_started()
        if self._channel is None:
            raise RuntimeError(f"grpc executor for environment '{self._environment}' is stopped.")
        kind = frame.get("type")
        if kind == "run_task":
            # bulky: a binary frame once the worker said it reads them (the first bulky run
            # waits for its answer); small: JSON, which costs less (wove.framing.worth_binary)
            binary = worth_binary(frame) and await self._use_binary()
            if self._channel is None:
                raise RuntimeError(f"grpc executor for environment '{self._environment}' is stopped.")
            body = self._encode_command(frame, binary)  # DispatchError names the task and the path
            self._check_payload(frame, len(body))  # PayloadTooLargeError before anything is sent
            entry = self._track(frame, len(body))
            if self._uses_session():
                self._session_send(entry.run_id, frame, body)
            elif not self._start_unary(entry, body):
                self._calls[entry.run_id] = asyncio.get_running_loop().create_task(self._deliver(entry, body))
        elif kind == "stream_credit":  # a streamed run: on the Session that carries it (task_yield announced)
            session = self._session
            if session is not None and frame.get("run_id") in session.bodies:
                session.put(frame, encode_frame(frame))
        elif kind == "cancel_task":
            session = self._session
            if session is not None and frame.get("run_id") in session.bodies:
                # the worker answers task_cancelled on the session
                session.put(frame, encode_frame(frame))
            else:
                self._spawn(self._cancel(frame))
        elif kind == "shutdown":
            # A worker service is shared; the runtime already sent cancel_task for its runs.
            logger.debug("environment=%s: shutdown (not forwarded to %s)", self._environment, self._target)
        else:
            raise ValueError(
                f"grpc executor for environment '{self._environment}' cannot send a frame of type {kind!r}; "
                "expected run_task, cancel_task or shutdown."
            )

    async def negotiate_capabilities(self) -> frozenset[str]:
        """What the worker announced when it confirmed the Session method
        (``wove-capabilities``); opens the Session when none is open yet. Runs over
        ``Send``/``Stream`` (``streaming`` true/false, or a ``timeout``) learn only
        ``binary_frames``, from a Session call opened and closed without a command."""
        if self._channel is None:
            return self.capabilities
        if not self._uses_session():
            if self._binary is None:
                await self._probe_binary()
            return self.capabilities
        session = self._session
        if session is None:
            session = self._session = self._open_session()
        try:
            await asyncio.wait_for(asyncio.shield(session.answered), SESSION_CONFIRM_TIMEOUT + _STATUS_WAIT + 1.0)
        except asyncio.TimeoutError:
            return self.capabilities
        return self.capabilities

    def _encode_command(self, frame: dict[str, Any], binary: bool) -> _Body:
        """The run_task encoded: a binary frame over CHUNKED_ABOVE for a Session whose worker
        reads chunks stays in parts (views of the value's buffers, never joined)."""
        if not binary:
            return encode_frame(frame)
        session = self._session
        if session is not None and self._uses_session() and session.chunked():
            parts = Parts(encode_binary_parts(frame))
            return parts if len(parts) > CHUNKED_ABOVE else parts.join()
        return encode_frame(frame, binary=True)

    def _check_received(self, size: int) -> None:
        """A chunked frame from the worker must fit the receive limit (as one message must)."""
        if self._receive_limit is not None and size > self._receive_limit:
            raise ProtocolError(f"A chunked frame of {size} bytes from the worker exceeds this client's receive limit "
                                f"of {self._receive_limit} bytes; raise executor_config.max_message_bytes to accept it")

    def _uses_session(self) -> bool:
        return self._streaming == "session" or (self._streaming == "auto" and self._timeout is None)

    def _peer_binary(self) -> bool:
        """Commands go as binary frames: the worker announced them and the config allows it."""
        return self._binary_frames and self._binary is True

    async def _use_binary(self) -> bool:
        """Whether the next run_task is a binary frame; the first one waits for the answer of
        the Session (or of the capability probe of per-call runs)."""
        if not self._binary_frames:
            return False
        if self._uses_session():
            session = self._session
            if session is None:
                session = self._session = self._open_session()
            if not session.answered.done():
                try:
                    await asyncio.wait_for(asyncio.shield(session.answered), _ANSWER_WAIT)
                except asyncio.TimeoutError:
                    return False
            return CAPABILITY_BINARY_FRAMES in session.answered.result()
        if self._binary is None:
            await self._probe_binary()
        return self._peer_binary()

    async def _probe_binary(self) -> None:
        """One capability probe at a time, shared by the runs that wait for it."""
        probe = self._probe
        if probe is None or probe.done():
            probe = self._probe = asyncio.get_running_loop().create_task(self._probe_capabilities())
        try:
            await asyncio.wait_for(asyncio.shield(probe), _ANSWER_WAIT)
        except asyncio.TimeoutError:
            pass
        except asyncio.CancelledError:
            if not probe.cancelled():  # we were cancelled, not the probe (stop() ends it)
                raise

    async def _probe_capabilities(self) -> None:
        """Open a Session call, read its confirmation, close it without writing a command.

        Sets :attr:`_binary`; a worker that cannot be reached leaves it unknown (the next
        run probes again), any other answer without the confirmation (``UNIMPLEMENTED``
        from a Wove 2.x server) means JSON.
        """
        if self._session_rpc is None:
            return
        grpc = self._grpc
        call = self._session_rpc(metadata=self._call_metadata(self._session_method, b""),
                                 timeout=SESSION_CONFIRM_TIMEOUT + _STATUS_WAIT)
        try:
            metadata = await asyncio.wait_for(call.initial_metadata(), SESSION_CONFIRM_TIMEOUT)
            if metadata is not None and metadata.get(SESSION_CONFIRMATION_KEY) is not None:
                self._binary = CAPABILITY_BINARY_FRAMES in _announced(metadata)
                if self._binary:
                    self.capabilities = self.capabilities | {CAPABILITY_BINARY_FRAMES}
                await call.done_writing()
                await asyncio.wait_for(call.code(), _STATUS_WAIT)
                return
            code = await asyncio.wait_for(call.code(), _STATUS_WAIT)
            if code != grpc.StatusCode.UNAVAILABLE:
                self._binary = False
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a timeout, a failed write: JSON is always understood
            logger.debug("environment=%s: capability probe of %s: %r", self._environment, self._target, exc)
            if self._binary is None:
                self._binary = False
        finally:
            if not call.done():
                call.cancel()
        if self._binary is not None:
            logger.debug("environment=%s: %s announces binary_frames: %s", self._environment, self._target,
                         self._binary)

    def _reencode(self, frame: dict[str, Any], binary: bool) -> bytes | None:
        """``frame`` encoded again for a worker that speaks the other kind (a re-delivery to
        a worker that changed); None when it no longer fits (its run got a task_error)."""
        try:
            body = encode_frame(frame, binary=binary)
            if frame.get("type") == "run_task":
                self._check_payload(frame, len(body))
            return body
        except DispatchError as exc:  # PayloadTooLargeError included
            if frame.get("type") == "run_task" and frame.get("run_id") in self._inflight:
                self._emit(transport_error_event(frame, str(exc), exc, retryable=False))
            return None

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _call_metadata(self, method: str, body: bytes) -> tuple[tuple[str, str], ...] | None:
        """The call's metadata: the configured ``metadata``, the signature, and (to a worker
        known to read binary frames, and on every Session) ``wove-capabilities:
        binary_frames``, so the worker answers a bulky result of a small command in binary
        (on a Session also ``binary_chunks``: a large one in chunks)."""
        metadata = self._metadata
        if self._binary_frames and method == self._session_method:
            metadata = (*metadata, _READS_CHUNKS)
        elif self._binary_frames and self._binary is True:
            metadata = (*metadata, _READS_BINARY)
        if self._security.mode == "none":
            return metadata or None
        return (*metadata, *self._security.metadata_for(transport="grpc", target=method, body=body))

    def _wants_stream(self, frame: dict[str, Any]) -> bool:
        if self._streaming is True:
            return True
        if self._streaming in ("auto", "auto-calls"):  # per-run calls under "auto"
            return bool((frame.get("delivery") or {}).get("delivery_heartbeat_seconds"))
        return False

    # -- Session extension ------------------------------------------------------------
    def _session_send(self, run_id: str, frame: dict[str, Any], body: _Body) -> None:
        session = self._session
        if session is None:
            session = self._session = self._open_session()
        session.bodies[run_id] = body
        session.put(frame, body)

    def _open_session(self) -> _Session:
        call = self._session_rpc(metadata=self._call_metadata(self._session_method, b""))
        session = _Session(call)
        loop = asyncio.get_running_loop()
        session.tasks = [loop.create_task(self._session_writer(session)), loop.create_task(self._session_reader(session))]
        return session

    async def _session_confirmed(self, session: _Session) -> bool:
        """Wait for the server's answer to the Session call; False: the call already ended.

        No command is written before the server answered: a server without Session (a
        Wove 2.x-style server) answers UNIMPLEMENTED at once, and a write racing that
        answer fails in grpc's core, which then reports the call as ``INTERNAL: Internal
        error from Core`` instead of UNIMPLEMENTED. Our servers confirm Session with
        initial metadata before they read a command (``SESSION_CONFIRMATION_KEY``).
        """
        try:
            return await self._await_session_answer(session)
        finally:
            session.answer(frozenset())  # no capabilities unless the confirmation named them

    async def _await_session_answer(self, session: _Session) -> bool:
        call = session.call
        try:
            metadata = await asyncio.wait_for(call.initial_metadata(), SESSION_CONFIRM_TIMEOUT)
        except asyncio.TimeoutError:
            # no answer yet: a slow connection, or a server that sends its metadata only
            # with its first message; write as before
            return not call.done()
        if metadata is not None and metadata.get(SESSION_CONFIRMATION_KEY) is not None:
            session.confirmed = True
            session.answer(_announced(metadata))
            self.capabilities = session.answered.result()
            self._binary = CAPABILITY_BINARY_FRAMES in self.capabilities
            return True
        if call.done():
            return False
        try:  # metadata without the confirmation: an error status usually follows at once
            await asyncio.wait_for(call.code(), _STATUS_WAIT)
        except asyncio.TimeoutError:
            return True  # a server that serves Session without confirming it
        return False

    async def _session_writer(self, session: _Session) -> None:
        try:
            if not await self._session_confirmed(session):
                return  # the call ended before anything was written: the reader reports why
            binary = self._binary_frames and CAPABILITY_BINARY_FRAMES in session.answered.result()
            chunked = binary and session.chunked()
            limit = min(_BATCH_BYTES, self._payload.max_bytes)
            while True:
                await session.wake.wait()
                session.wake.clear()
                while session.pending:
                    kind, batch = self._batch(session, binary, chunked, limit)
                    first = batch[0] if batch else None
                    if isinstance(first, Parts):  # a large frame alone, in chunks
                        for chunk in chunks(first.parts, CHUNK_BYTES):
                            await session.call.write(chunk)
                    elif batch:  # binary frames say their own length: back to back; JSON: a list
                        bodies: list[bytes] = batch  # type: ignore[assignment]
                        await session.call.write(bodies[0] if len(bodies) == 1 else
                                                 b"".join(bodies) if kind else b"[" + b",".join(bodies) + b"]")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the reader reports the call's failure
            logger.debug("environment=%s: session write failed: %r", self._environment, exc)

    def _batch(self, session: _Session, binary: bool, chunked: bool, limit: int) -> tuple[bool, list[_Body]]:
        """Take the next commands to write as one message (at most ``limit`` bytes past the
        first), all of one kind: ``(binary, bodies)``. A binary body for a worker that does
        not read them (encoded before this session's worker answered) is encoded again as
        JSON; JSON every worker reads. A frame kept in parts goes alone (written in chunks),
        or joined for a worker that does not read chunks."""
        batch: list[_Body] = []
        kind = False
        size = taken = 0
        for frame, body in session.pending:
            if isinstance(body, Parts) and binary and not chunked:
                body = body.join()
                run_id = str(frame.get("run_id"))
                if frame.get("type") == "run_task" and run_id in session.bodies:
                    session.bodies[run_id] = body
                session.pending[taken] = (frame, body)
            if isinstance(body, Parts) and binary:
                if batch:
                    break
                taken += 1
                batch.append(body)
                kind = True
                break
            if not binary and (isinstance(body, Parts) or is_binary(body)):
                run_id = str(frame.get("run_id"))
                fresh = self._reencode(frame, False)
                if fresh is None:
                    session.bodies.pop(run_id, None)
                    taken += 1
                    continue
                if frame.get("type") == "run_task" and run_id in session.bodies:
                    session.bodies[run_id] = fresh
                session.pending[taken] = (frame, fresh)
                body = fresh
            this = is_binary(body)
            if batch and (this is not kind or size + len(body) > limit):
                break
            kind = this
            taken += 1
            batch.append(body)
            size += len(body)
        del session.pending[:taken]
        return kind, batch

    async def _session_reader(self, session: _Session) -> None:
        grpc = self._grpc
        failure: BaseException | None = None
        reassembler = ChunkAssembler(self._check_received, drop_refused=True, by_segment=True)  # a large binary frame may come in chunks
        try:
            async for message in session.call:
                session.received = session.confirmed = True
                data = reassembler.feed(message)
                del message
                if data is None:
                    continue  # a chunk: the frame is not whole yet
                events = decode_events(data)  # JSON or binary frames, whatever the worker sent
                self._warn_received(events, len(data))
                del data
                for event in events:
                    if event.get("type") in ("task_result", "task_error", "task_cancelled"):
                        session.bodies.pop(str(event.get("run_id")), None)
                    self._emit(event)
            failure = _BadResponse("the worker ended the session with runs in flight")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failure = exc
        if self._session is session:
            self._session = None
        for task in session.tasks:
            if task is not asyncio.current_task():
                task.cancel()
        if not session.bodies:
            return
        if isinstance(failure, grpc.aio.AioRpcError):
            code = failure.code()
            if self._streaming == "auto" and _no_session(grpc, code, session):
                logger.info("environment=%s: %s does not offer %s; using %s / %s per run",
                            self._environment, self._target, self._session_method, self._method, self._stream_method)
                self._streaming = "auto-calls"
                self._binary = False  # no Session: nothing announced, JSON per call
                self.capabilities = frozenset()
                for run_id, body in session.bodies.items():
                    entry = self._inflight.get(run_id)
                    if entry is not None:  # nothing ran: the same delivery goes per call
                        self._calls[run_id] = asyncio.get_running_loop().create_task(self._deliver(entry, body))
                return
            reason = describe_rpc_error(failure, method=self._session_method, target=self._target, tls=self._tls)
            retry = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        else:
            reason = f"gRPC session with {self._target} failed: {type(failure).__name__}: {failure}"
            retry = isinstance(failure, _BadResponse)
        again = [(run_id, body) for run_id, body in session.bodies.items()
                 if self._lost(run_id, reason, failure, redeliverable=retry)]
        if not again:
            return
        if isinstance(failure, grpc.aio.AioRpcError) and failure.code() == grpc.StatusCode.UNAVAILABLE:
            await self._wait_ready()
        await asyncio.sleep(self._redelivery_delay(again[0][0]))  # the shared back-off (wove.transport)
        if self._channel is None:
            return
        for run_id, body in again:
            entry = self._inflight.get(run_id)
            if entry is not None:
                self._track(entry.frame)
                self._session_send(run_id, entry.frame, body)

    def _start_unary(self, entry: InFlight, body: _Body) -> bool:
        """Start the run's Send call on the native client's open connection, answered in its
        callback (:meth:`_answered`), with no task per run; False (nothing sent) where
        :meth:`_deliver` must carry it: no native client or no open connection yet, a
        deadline, a streamed call, a binary body the worker does not read."""
        native = self._native
        if (native is None or self._timeout is not None or type(body) is not bytes
                or self._wants_stream(entry.frame) or (is_binary(body) and not self._peer_binary())):
            return False
        call = _NativeCall(self, entry, body)
        stream = native.start(body, call.answered, metadata=self._call_metadata(self._method, body))
        if stream is None:
            return False
        call.stream = stream
        self._calls[entry.run_id] = call
        return True

    def _answered(self, call: _NativeCall, result: bytes | BaseException) -> None:
        """A native Send call ended: its events go to the runtime; a failure (to retry, or
        to report by the re-delivery policy) continues in :meth:`_deliver`, as it would
        have there."""
        run_id = call.entry.run_id
        if self._calls.get(run_id) is call:
            del self._calls[run_id]
        if self._channel is None:  # stopped (its calls were given up: none is answered after)
            return
        if isinstance(result, BaseException):
            # a call the server did not process goes again at once (grpc's transparent
            # retry, which that call then has spent)
            if call.stream is not None and call.stream.unprocessed:
                again = self._deliver(call.entry, call.body, retried=True)
            else:
                again = self._deliver(call.entry, call.body, result)
            self._calls[run_id] = asyncio.get_running_loop().create_task(again)
            return
        try:
            self._emit_all(result)
            if run_id in self._inflight:
                raise _BadResponse("the response ended without a terminal event for the run")
        except (_BadResponse, ProtocolError) as exc:
            self._malformed(run_id, self._method, exc)
        except Exception as exc:  # never lose a run silently
            self._failed(run_id, exc)

    def _malformed(self, run_id: str, method: str, exc: Exception) -> None:
        self._lost(run_id, f"gRPC call {method} to {self._target} returned a malformed response: {exc}",
                   exc, redeliverable=False)

    def _failed(self, run_id: str, exc: Exception) -> None:
        logger.exception("environment=%s: delivery of %s failed", self._environment, run_id)
        self._lost(run_id, f"gRPC delivery to {self._target} failed: {type(exc).__name__}: {exc}", exc,
                   redeliverable=False)

    async def _deliver(self, entry: InFlight, body: _Body, failure: BaseException | None = None, *,
                       retried: bool = False) -> None:
        """Run one delivery after another until the run ends or is given up; ``failure``:
        how the first delivery (a native call, :meth:`_start_unary`) ended; ``retried``:
        that call went unprocessed and this is its one transparent retry (a second
        refusal is then a failure of the delivery, not another retry)."""
        grpc = self._grpc
        run_id = entry.run_id
        if isinstance(body, Parts):  # meant for a Session that reads chunks: one message per call
            body = body.join()
        try:
            while True:
                stream = self._wants_stream(entry.frame)
                method = self._stream_method if stream else self._method
                received = False
                if is_binary(body) and not self._peer_binary():  # the worker's answer changed what it reads
                    fresh = self._reencode(entry.frame, False)
                    if fresh is None:
                        return
                    body = fresh
                try:
                    spent, retried = retried, False  # only this attempt continues the native call
                    if failure is not None:  # the first delivery's failure, handled as this one's
                        error, failure = failure, None
                        raise error
                    if stream:
                        call = self._stream(body, metadata=self._call_metadata(method, body), timeout=self._timeout)
                        async for message in call:
                            received = True
                            self._emit_all(message)
                    elif spent and self._native is not None and self._unary is self._native:
                        self._emit_all(await self._native(
                            body, metadata=self._call_metadata(method, body), timeout=self._timeout,
                            retry_unprocessed=False))
                    else:
                        self._emit_all(await self._unary(
                            body, metadata=self._call_metadata(method, body), timeout=self._timeout
                        ))
                    if run_id in self._inflight:
                        raise _BadResponse("the response ended without a terminal event for the run")
                    return
                except grpc.aio.AioRpcError as exc:
                    code = exc.code()
                    # another run may have switched to Send already (runs race to find out)
                    if (stream and code == grpc.StatusCode.UNIMPLEMENTED and not received
                            and self._streaming is not True):
                        logger.info("environment=%s: %s does not offer %s; using %s for this environment",
                                    self._environment, self._target, method, self._method)
                        self._streaming = False
                        continue  # nothing ran: not a delivery
                    reason = describe_rpc_error(exc, method=method, target=self._target, tls=self._tls)
                    retry = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
                    if not self._lost(run_id, reason, exc, redeliverable=retry):
                        return
                    if code == grpc.StatusCode.UNAVAILABLE:
                        await self._wait_ready()
                    await asyncio.sleep(self._redelivery_delay(run_id))  # the shared back-off (wove.transport)
                    self._track(entry.frame)
                except (_BadResponse, ProtocolError) as exc:
                    self._malformed(run_id, method, exc)
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never lose a run silently
            self._failed(run_id, exc)
        finally:
            if self._calls.get(run_id) is asyncio.current_task():
                del self._calls[run_id]

    def _emit_all(self, data: bytes) -> None:
        if not data:
            raise _BadResponse("empty message")
        events = decode_events(data)  # JSON or binary frames
        self._warn_received(events, len(data))
        for event in events:
            self._emit(event)

    async def _wait_ready(self) -> bool:
        """Wait (bounded by ready_timeout, shared by every run) for the channel to be ready."""
        if self._ready_waiter is None or self._ready_waiter.done():
            self._ready_waiter = asyncio.get_running_loop().create_task(self._ready())
        try:
            return await asyncio.shield(self._ready_waiter)
        except asyncio.CancelledError:
            raise

    async def _ready(self) -> bool:
        try:
            await asyncio.wait_for(self._channel.channel_ready(), self._ready_timeout)
            return True
        except (asyncio.TimeoutError, AttributeError):
            logger.warning("environment=%s: %s not ready within %gs", self._environment, self._target, self._ready_timeout)
            return False

    async def _cancel(self, frame: dict[str, Any]) -> None:
        """Cancel the run's call, tell the worker (cancel_task through Send) and report."""
        run_id = str(frame.get("run_id"))
        call = self._calls.pop(run_id, None)
        if call is not None:
            call.cancel()
        body = encode_frame(frame)
        failure: BaseException | None = None
        try:
            reply = await self._unary(body, metadata=self._call_metadata(self._method, body),
                                      timeout=min(self._timeout or CANCEL_TIMEOUT, CANCEL_TIMEOUT))
            events = decode_events(reply) if reply else []
        except Exception as exc:
            failure, events = exc, []
        for event in events:
            self._emit(event)
        entry = self._inflight.get(run_id)
        if entry is None:
            return
        if failure is None:
            self._emit({"type": "task_cancelled", "run_id": run_id, "task_id": entry.frame["task_id"]})
            return
        detail = (f"{failure.code().name}: {failure.details()}" if isinstance(failure, self._grpc.aio.AioRpcError)
                  else f"{type(failure).__name__}: {failure}")
        self._emit(transport_error_event(
            entry.frame,
            f"cancel_task for run {run_id} could not be delivered to {self._target} ({detail}); its call was "
            "cancelled, but the worker did not confirm and may still run it.",
            failure, retryable=False,
        ))


class _NativeCall:
    """A run's Send call on the native client, answered in the connection's callback."""

    __slots__ = ("body", "entry", "executor", "stream")

    def __init__(self, executor: GrpcEnvironmentExecutor, entry: InFlight, body: bytes) -> None:
        self.executor = executor
        self.entry = entry
        self.body = body
        self.stream: _Stream | None = None

    def answered(self, result: bytes | BaseException) -> None:
        self.executor._answered(self, result)

    def cancel(self) -> None:
        """Give the call up (it is not answered after this)."""
        if self.stream is not None:
            self.stream.cancel()


class _ErrorRule(NamedTuple):
    code: str  #: grpc status code name
    pattern: re.Pattern[str] | None  #: searched in the status details; None: any
    tls: bool | None  #: the channel uses TLS (True), plaintext (False), either (None)
    label: str | None  #: what went wrong, in words (None: the details say it)
    hint: str  #: the fix


def _rule(code: str, pattern: str | None, label: str | None, hint: str, tls: bool | None = None) -> _ErrorRule:
    return _ErrorRule(code, re.compile(pattern, re.IGNORECASE) if pattern else None, tls, label, hint)


_TLS_KEYS = "executor_config.tls, ca_file, cert_file, key_file and server_hostname"
_SETUP_CLOSED = r"failed to connect.*(socket closed|connection reset|broken pipe|end of file|eof)"
#: The one table of gRPC failures: status code + details pattern (+ channel kind) ->
#: label and hint. The first matching row wins; every failure of a call is described by it.
ERROR_TABLE: tuple[_ErrorRule, ...] = (
    _rule("UNAVAILABLE", r"WRONG_VERSION_NUMBER|packet length too long|http_request|HTTP_REQUEST",
          "TLS handshake failed: the worker answered in plaintext, it does not serve TLS",
          "Set executor_config.tls to false (and drop ca_file) for a plaintext worker, "
          "or start the worker with --certfile and --keyfile.", tls=True),
    _rule("UNAVAILABLE", r"CERTIFICATE_VERIFY_FAILED|certificate verify failed|unable to get local issuer"
          r"|self[- ]signed|certificate has expired|certificate is not yet valid",
          "TLS handshake failed: the worker's certificate could not be verified",
          "Set executor_config.ca_file to the CA that signed the worker's certificate "
          "(--certfile), as a file path, PEM text or bytes.", tls=True),
    _rule("UNAVAILABLE", r"hostname verification|peer name|not in peer certificate|subject alternative name",
          "TLS handshake failed: the worker's certificate does not name the host in executor_config.target",
          "Use a target host the certificate was issued for, set executor_config.server_hostname to a name "
          "it was issued for, or issue the worker's certificate (--certfile) for this host.", tls=True),
    _rule("UNAVAILABLE", _SETUP_CLOSED,
          "the worker closed the TLS connection during the handshake, as a worker that requires client "
          "certificates (--client-ca) does to a client without an accepted one",
          "Set executor_config.cert_file and key_file to a client certificate signed by the "
          "worker's --client-ca.", tls=True),
    _rule("UNAVAILABLE", r"tls handshake|handshake fail|TSI_|SSL_ERROR|SSL routines",
          "TLS handshake failed",
          f"Check {_TLS_KEYS} against the worker's --certfile, --keyfile and --client-ca.", tls=True),
    _rule("UNAVAILABLE", _SETUP_CLOSED,
          "the worker closed the connection before answering, as a TLS worker does to a plaintext client",
          "If the worker serves TLS (--certfile), set executor_config.tls to true and "
          "executor_config.ca_file to its CA.", tls=False),
    _rule("UNAVAILABLE", None, None, "Is the worker service running and reachable at this target?"),
    _rule("UNAUTHENTICATED", None, None,
          "Set executor_config.security like the worker's --security: \"env:VAR\" (signed, VAR holding its "
          "secret) or \"bearer:env:VAR\" (VAR holding its token)."),
    _rule("PERMISSION_DENIED", r"bearer", None,
          "Set the token in executor_config.security to the worker's bearer token."),
    _rule("PERMISSION_DENIED", r"expired|in the future", None,
          "Check the clocks of this machine and the worker: signatures are valid for clock_skew_seconds."),
    _rule("PERMISSION_DENIED", r"unknown signing key", None,
          "Set the key in executor_config.security to a key id the worker knows (default \"default\")."),
    _rule("PERMISSION_DENIED", r"replay", None,
          "Each request needs a fresh nonce; if the worker's replay cache is full, retry later."),
    _rule("PERMISSION_DENIED", None, None,
          "Check that executor_config.security holds the worker's secret (and key id)."),
    _rule("DEADLINE_EXCEEDED", None, None, "The call outlived executor_config.timeout."),
    _rule("UNIMPLEMENTED", None, None,
          "The worker does not serve this method: check executor_config.method, stream_method and session_method."),
    _rule("RESOURCE_EXHAUSTED", r"larger than max|message length|too large", None,
          "The message exceeds a size limit: executor_config.max_message_bytes here (or "
          "executor_config.options grpc.max_send_message_length / grpc.max_receive_message_length, "
          "when set there), --max-body-bytes on the worker."),
)


def describe_rpc_error(exc: Any, *, method: str, target: str, tls: bool) -> str:
    """One sentence for a failed gRPC call, from :data:`ERROR_TABLE`.

    ``gRPC call METHOD to TARGET failed with CODE: LABEL (DETAILS). HINT`` (without a
    label: ``...CODE: DETAILS. HINT``). The server's details appear once, the hint once.

    Args:
        exc: the ``grpc.aio.AioRpcError`` (anything with ``code()`` and ``details()``).
        method / target: the call's method path and the channel's target.
        tls: whether the channel uses TLS.
    """
    code = exc.code()
    name = getattr(code, "name", str(code))
    details = " ".join((exc.details() or "").split()).rstrip(". ") or "no details"
    rule = next((r for r in ERROR_TABLE if r.code == name and (r.tls is None or r.tls == tls)
                 and (r.pattern is None or r.pattern.search(details))), None)
    text = details if rule is None or rule.label is None else f"{rule.label} ({details})"
    message = f"gRPC call {method} to {target} failed with {name}: {text}."
    return f"{message} {rule.hint}" if rule is not None else message


def _host_port(target: str) -> tuple[str, int] | None:
    """``host:port`` (``[v6]:port``, ``dns:///host:port``) of a target, or None."""
    if target.startswith("dns:///"):
        target = target[len("dns:///"):]
    match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([A-Za-z0-9.\-_]+):(\d+)", target)
    if match is None:
        return None
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    return (host, port) if 0 < port < 65536 else None


def _no_session(grpc: Any, code: Any, session: _Session) -> bool:
    """The Session call's failure means "no such method": its runs may go per call instead.

    UNIMPLEMENTED before any response message; INTERNAL or UNKNOWN before the server
    confirmed Session (a failure from grpc's core, such as a write racing the server's
    UNIMPLEMENTED). Either way the server accepted no command: a server that serves
    Session confirms it before it reads one, so no run executes twice.
    """
    if session.received:
        return False
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return True
    return code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) and not session.confirmed
