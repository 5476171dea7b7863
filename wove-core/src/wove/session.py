"""The worker side of the protocol, written once: every worker service is an I/O shell over it.

A :class:`WorkerService` holds what the sessions of one service share: the
:class:`~wove.worker.WorkerEngine`, the security check, the limits and the rules. A
:class:`WorkerSession` is one client's conversation (a stdio pipe, a WebSocket connection,
a gRPC call, one HTTP request): bytes in, events out, and no I/O of its own, in the style
of the websockets library's ``protocol.py``. A shell does only this::

    service = WorkerService(security="env:WOVE_SECRET", name="myproto")
    service.authenticate(headers, transport="myproto", target=path, body=body)  # Rejected -> 401/403/413
    session = service.session(peer)
    await session.receive(message)          # one command, or a JSON list of commands
    for data in session.data_to_send():     # encoded events, framed as asked
        await transport.write(data)
    await session.wait()                    # until there are events to send, or the session ends
    session.connection_lost()               # the client went away: the one disconnect rule

The rules, the same on every transport:

* **Verification before decoding.** :meth:`WorkerService.precheck` refuses what the
  headers alone prove wrong (before a body is read), :meth:`WorkerService.authenticate`
  checks the signature or token and the size limit, before anything is unpickled.
* **Malformed input executes nothing.** A command naming a run answers that run with a
  ``task_error``; anything else with a ``log`` event, or, for a request/response shell
  that asks for ``strict``, :class:`Rejected` (HTTP 400 / gRPC INVALID_ARGUMENT).
* **A client that disconnects** with runs in flight: runs with orphan policy ``cancel`` or
  ``fail`` are cancelled; ``requeue`` and ``detach`` runs, and runs with an idempotency
  key, keep running, and a re-delivery of the same run (same ``run_id`` or idempotency
  key) within the engine's retention window gets the result of the execution already
  going or finished, not a second execution.
* **A ``shutdown`` command** is obeyed by a worker that one client owns (``exclusive``:
  stdio) and, on a shared service, ignored with a log line unless the service allows
  remote shutdown.
* **A slow reader**: a session holds at most ``max_pending_events`` events its client has
  not taken; beyond that :attr:`WorkerSession.reading_paused` is true and the shell stops
  reading commands (:meth:`WorkerSession.wait_readable`) instead of buffering without bound.
* **At most ``max_runs_per_session`` runs** in progress per session; more are answered with
  a retryable ``task_error`` (``TooManyRuns``).
* **Drain** (:meth:`WorkerService.drain`): stop accepting, let runs finish within the
  grace period, end the rest with a terminal event (``requeue`` runs end silently, so
  their clients deliver them elsewhere), then every session ends.

Counting, once for every transport: a service with metrics (``metrics=True`` or
:meth:`WorkerService.enable_metrics`; :mod:`wove.metrics`) counts here the runs each
session accepted and how they ended, their execution time, the requests and commands
refused by reason, and the sessions; a shell reports only its connections
(:meth:`WorkerService.connection_opened`) and the refusals of its own framing
(:meth:`WorkerService.record_rejection`). Readiness is :attr:`WorkerService.ready`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal

from .errors import ProtocolError
from .framing import worth_binary
from .options import DEFAULT_MAX_MESSAGE_BYTES
from .protocol import (
    CAPABILITY_BINARY_FRAMES,
    CAPABILITY_TASK_YIELD,
    ORPHAN_POLICIES,
    TERMINAL_EVENTS,
    SplitFrame,
    decode_command,
    encode_event,
    encode_event_parts,
    encode_events,
    error_event,
    is_binary,
    parse_frames,
)
from .security import MissingCredentialsError, NetworkExecutorSecurity
from .worker import WorkerEngine

if TYPE_CHECKING:
    from .metrics import ServiceMetrics

__all__ = [
    "DEFAULT_MAX_COMMAND_BYTES",
    "DEFAULT_MAX_PENDING_EVENTS",
    "DEFAULT_MAX_RUNS_PER_SESSION",
    "SERVICE_CAPABILITIES",
    "Framing",
    "Rejected",
    "WorkerService",
    "WorkerSession",
]

logger = logging.getLogger(__name__)

#: The one default size limit of a command (every service, every transport).
DEFAULT_MAX_COMMAND_BYTES = DEFAULT_MAX_MESSAGE_BYTES
#: Events a session holds for a client that does not read them before it stops reading commands.
DEFAULT_MAX_PENDING_EVENTS = 1024
DEFAULT_MAX_RUNS_PER_SESSION = 10_000

#: How :meth:`WorkerSession.data_to_send` frames events: ``envelope`` → one
#: ``{"events": [...]}``; ``list`` → one JSON list (one event alone as itself); ``lines``
#: → one event per line (NDJSON, stdio); ``each`` → one message per event.
Framing = Literal["envelope", "list", "lines", "each"]

#: What every service over :class:`WorkerService` announces to its clients (each shell says
#: it its own way: the stdio ready line, an ``X-Wove-Capabilities`` header, gRPC metadata):
#: streamed generator results (``task_yield`` / ``stream_credit``) and binary frames
#: (docs/wire.md).
SERVICE_CAPABILITIES = frozenset({CAPABILITY_TASK_YIELD, CAPABILITY_BINARY_FRAMES})

_PROGRESS = frozenset({"task_started", "heartbeat"})
_HEAD = 4096


def _field(head: bytes, name: str) -> str | None:
    """A string field near the start of a JSON object, found without parsing the whole."""
    match = re.search(rb'"' + name.encode() + rb'"\s*:\s*"([^"\\]{1,512})"', head)
    return match.group(1).decode("utf-8", "replace") if match else None


_KEEP_ON_DISCONNECT = frozenset({"requeue", "detach"})
#: a terminal event's type -> the outcome label of ``wove_worker_runs_completed_total``
_OUTCOME = {"task_result": "result", "task_error": "error", "task_cancelled": "cancelled"}


def _auth_reason(exc: PermissionError) -> str:
    """The rejection reason (:data:`wove.metrics.REJECTION_REASONS`) of a failed verification."""
    text = str(exc)
    if text.startswith(("Replayed request", "Replay cache")):
        return "replay"
    if text.startswith("Expired signature") or "in the future" in text:
        return "expired"
    return "bad_credentials"


class Rejected(Exception):
    """A request the service refuses before decoding anything.

    Attributes:
        status: the HTTP status a shell answers with (400, 401, 403 or 413).
        reason: ``bad_request``, ``unauthenticated``, ``permission_denied`` or ``too_large``
            (a gRPC shell maps them to INVALID_ARGUMENT, UNAUTHENTICATED,
            PERMISSION_DENIED, RESOURCE_EXHAUSTED).
        detail: what was wrong, without ``fix`` (for a shell whose clients add their own
            hint, such as gRPC's); ``str(rejected)`` is ``detail`` and ``fix`` together.
        fix: what the client should change ("" when the detail says it).
    """

    _STATUS = {"bad_request": 400, "unauthenticated": 401, "permission_denied": 403, "too_large": 413}

    def __init__(self, reason: str, message: str, *, fix: str = "") -> None:
        super().__init__(f"{message} {fix}" if fix else message)
        self.reason = reason
        self.status = self._STATUS[reason]
        self.detail = message
        self.fix = fix


class WorkerService:
    """What the sessions of one worker service share (see the module docstring).

    Args:
        engine: the worker engine (default: a new one with ``max_concurrency``).
        name: the service's name in logs and errors (``http``, ``grpc``...).
        security: ``NetworkExecutorSecurity``, a ``security`` config value (``"env:VAR"``,
            a dict, ``"none"``) or None (no authentication: loopback development only).
        exclusive: one client owns this worker (stdio): it obeys that client's ``shutdown``.
        allow_remote_shutdown: a shared service obeys ``shutdown`` commands too.
        max_command_bytes: largest accepted command (request body or message).
        max_runs_per_session: runs in progress per session.
        max_pending_events: events held for a session's client before reading pauses.
        max_concurrency: runs executing at once (for the default engine).
        grace: seconds ``detach`` runs may take to finish after a ``shutdown`` command, and
            the default drain period.
        metrics: count Prometheus metrics (True, or a :class:`~wove.metrics.ServiceMetrics`
            to count into); see :meth:`enable_metrics`.

    Attributes:
        metrics: the service's :class:`~wove.metrics.ServiceMetrics`, or None (not counted).

    Raises:
        ValueError / TypeError: invalid security configuration or limits.
        RuntimeError: a security environment variable is not set.
        ImportError: ``metrics`` without ``prometheus_client`` (``pip install "wove-core[metrics]"``).
    """

    def __init__(
        self,
        engine: WorkerEngine | None = None,
        *,
        name: str = "worker",
        security: Any = None,
        exclusive: bool = False,
        allow_remote_shutdown: bool = False,
        max_command_bytes: int = DEFAULT_MAX_COMMAND_BYTES,
        max_runs_per_session: int = DEFAULT_MAX_RUNS_PER_SESSION,
        max_pending_events: int = DEFAULT_MAX_PENDING_EVENTS,
        max_concurrency: int = 256,
        grace: float = 10.0,
        metrics: bool | ServiceMetrics = False,
    ) -> None:
        for label, value in (("max_command_bytes", max_command_bytes), ("max_runs_per_session", max_runs_per_session),
                             ("max_pending_events", max_pending_events)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{label} must be a positive integer, got {value!r}.")
        self.name = name
        self.engine = engine or WorkerEngine(max_concurrency=max_concurrency, name=name)
        self.security = NetworkExecutorSecurity.from_config(security).resolve()
        self.exclusive = exclusive
        self.allow_remote_shutdown = allow_remote_shutdown
        self.max_command_bytes = max_command_bytes
        self.max_runs_per_session = max_runs_per_session
        self.max_pending_events = max_pending_events
        self.grace = grace
        self.sessions: set[WorkerSession] = set()
        #: announced by the service's shell (see :data:`SERVICE_CAPABILITIES`)
        self.capabilities: frozenset[str] = SERVICE_CAPABILITIES
        self._drain: asyncio.Task[None] | None = None
        self._closing_callbacks: list[Callable[[], Awaitable[None] | None]] = []
        self.metrics: ServiceMetrics | None = None
        if metrics:
            self.enable_metrics(None if metrics is True else metrics)

    # -- metrics -----------------------------------------------------------------
    def enable_metrics(self, metrics: ServiceMetrics | None = None) -> ServiceMetrics:
        """Count this service's metrics from now on (sessions opened before are not
        counted: call it before serving); returns them. Calling it again returns the same.

        Args:
            metrics: count into these (default: a new :class:`~wove.metrics.ServiceMetrics`
                with its own registry).

        Raises:
            ImportError: ``prometheus_client`` is not installed (the message says how to install it).
            ValueError: the service already counts into other metrics.
        """
        if self.metrics is not None:
            if metrics is None or metrics is self.metrics:
                return self.metrics
            raise ValueError(f"The {self.name} worker service already counts its metrics; enable them once.")
        if metrics is None:
            from .metrics import ServiceMetrics

            metrics = ServiceMetrics(self.name)
        metrics.bind(self)
        self.metrics = metrics
        return metrics

    def record_rejection(self, reason: str) -> None:
        """Count a request the shell refused on its own (its framing: an HTTP body that
        timed out is ``timeout``, a bad ``Content-Length`` is ``bad_frame``); ``reason``
        is one of :data:`wove.metrics.REJECTION_REASONS`. What the service refuses
        (:class:`Rejected`, malformed commands, the run limit) it counts itself."""
        if self.metrics is not None:
            self.metrics.rejected(reason)

    def connection_opened(self) -> None:
        """A shell accepted a transport connection (for ``wove_worker_connections_*``)."""
        if self.metrics is not None:
            self.metrics.connection_opened()

    def connection_closed(self) -> None:
        """A transport connection of :meth:`connection_opened` closed."""
        if self.metrics is not None:
            self.metrics.connection_closed()

    # -- requests ----------------------------------------------------------------
    def precheck(self, headers: Mapping[str, Any]) -> None:
        """Refuse, from the headers alone, a request whose credentials are missing or
        wrong, so its body is never read (call before reading a body).

        Raises:
            Rejected: ``unauthenticated`` (401) or ``permission_denied`` (403).
        """
        if self.security.mode != "none":
            self._checked(self.security.precheck_headers, headers)

    def authenticate(self, headers: Mapping[str, Any] | Iterable[tuple[str, Any]], *, transport: str,
                     target: str, body: bytes = b"") -> None:
        """Verify a request (HTTP headers or gRPC metadata; a WebSocket handshake with an
        empty body) and its size, before anything in it is decoded.

        Raises:
            Rejected: ``too_large`` (413), ``unauthenticated`` (401), ``permission_denied`` (403).
        """
        self.check_size(len(body))
        if self.security.mode == "none":
            return
        if isinstance(headers, Mapping):
            self._checked(self.security.verify_headers, headers=headers, transport=transport, target=target, body=body)
        else:
            self._checked(self.security.verify_metadata, metadata=headers, transport=transport, target=target,
                          body=body)

    def check_size(self, size: int) -> None:
        """Raises :class:`Rejected` (``too_large``) for a command over ``max_command_bytes``."""
        if size > self.max_command_bytes:
            self.record_rejection("too_large")
            raise Rejected("too_large", self._too_large_message(size))

    def _too_large_message(self, size: int) -> str:
        return (f"Command of {size} bytes exceeds this worker's limit of {self.max_command_bytes} bytes; "
                "start the worker with a larger --max-body-bytes or send smaller arguments.")

    def _checked(self, check: Any, *args: Any, **kwargs: Any) -> None:
        try:
            check(*args, **kwargs)
        except MissingCredentialsError as exc:
            logger.warning("%s worker: rejected a request without credentials: %s", self.name, exc)
            self.record_rejection("unauthenticated")
            raise Rejected("unauthenticated", str(exc), fix="Configure executor_config.security with this "
                                                            "worker's secret or token.") from None
        except PermissionError as exc:
            logger.warning("%s worker: rejected a request: %s", self.name, exc)
            self.record_rejection(_auth_reason(exc))
            raise Rejected("permission_denied", f"Request rejected: {exc}") from None

    # -- sessions ----------------------------------------------------------------
    def session(self, peer: str = "?", *, emit: Callable[[dict[str, Any]], None] | None = None) -> WorkerSession:
        """A new session for one client (registered until it ends).

        Args:
            peer: who the client is, for logs.
            emit: hand each event to this callable as it happens instead of holding it
                for :meth:`WorkerSession.data_to_send` (a shell whose own writer buffers
                and pushes back, such as a pipe); it must not block.
        """
        session = WorkerSession(self, peer, emit=emit)
        self.sessions.add(session)
        if self.metrics is not None:
            self.metrics.session_opened()
        return session

    @property
    def closing(self) -> bool:
        """The service drains or shuts down: it accepts no new runs."""
        return self.engine.closing

    @property
    def ready(self) -> bool:
        """Accepting runs: what a readiness probe reports (False from the start of a drain
        or shutdown). Being at capacity does not make a service unready: runs beyond
        ``max_concurrency`` queue in the engine, and readiness that flapped with load would
        move that load onto the other workers in waves."""
        return self._drain is None and not self.engine.closing

    def health(self) -> dict[str, Any]:
        """``{"status": "ok" | "closing", "active": <runs>, "capabilities": [...]}`` for health endpoints."""
        return {"status": "closing" if self.closing else "ok", "active": self.engine.active,
                "capabilities": sorted(self.capabilities)}

    def add_closing_callback(self, callback: Callable[[], Awaitable[None] | None]) -> None:
        """Call ``callback`` (awaited when it returns an awaitable) when the service starts
        to drain or shut down, before it waits for any run: a shell whose readiness lives
        elsewhere (gRPC's health service) marks itself not serving there."""
        self._closing_callbacks.append(callback)

    def capabilities_header(self) -> str:
        """The value of the ``X-Wove-Capabilities`` header (comma-separated)."""
        return ", ".join(sorted(self.capabilities))

    async def drain(self, grace: float | None = None) -> None:
        """Stop accepting; runs finish within ``grace`` (default: the service's); the rest
        end by orphan policy; then every session ends (its shell sends what is left and
        closes). Safe to call more than once (later calls wait for the first)."""
        if self._drain is None:
            self._drain = asyncio.ensure_future(self._stop(None, self.grace if grace is None else grace, drain=True))
        await asyncio.shield(self._drain)

    async def shutdown(self, policy: str | None = None) -> None:
        """End every run by orphan policy now (``policy`` overrides each run's own;
        ``detach`` runs may finish within the grace period), then every session ends:
        what a ``shutdown`` command does, and what an exclusive worker does when its
        client goes away."""
        if self._drain is None:
            self._drain = asyncio.ensure_future(self._stop(policy, self.grace, drain=False))
        await asyncio.shield(self._drain)

    async def _stop(self, policy: str | None, grace: float, *, drain: bool) -> None:
        for callback in self._closing_callbacks:
            try:
                result = callback()
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception("%s worker: a closing callback failed", self.name)
        logger.info("%s worker: %s (%d runs active, grace %.1f s)", self.name, "draining" if drain else "shutting down",
                    self.engine.active, grace)
        if drain:
            await self.engine.drain(grace)
        else:
            await self.engine.shutdown(policy, grace=grace)
        for session in list(self.sessions):
            session._end()

    async def _shutdown_command(self, session: WorkerSession, frame: dict[str, Any]) -> None:
        policy = frame.get("delivery_orphan_policy")
        policy = policy if policy in ORPHAN_POLICIES else None
        if self.exclusive:
            logger.debug("%s worker: shutdown command (orphan policy %s)", self.name, policy or "per run")
            await self.shutdown(policy)
        elif self.allow_remote_shutdown:
            logger.info("%s worker: shutdown command from %s (orphan policy %s)", self.name, session.peer,
                        policy or "per run")
            asyncio.ensure_future(self.shutdown(policy))  # answer the client first
        else:
            logger.info("%s worker: ignored a shutdown command from %s (a shared service; start it with "
                        "--allow-remote-shutdown to obey)", self.name, session.peer)


class WorkerSession:
    """One client's conversation with a :class:`WorkerService` (module docstring).

    Attributes:
        peer: who the client is, for logs.
        runs: ``run_id -> (orphan policy, has idempotency key)`` of the runs in progress here.
        ended: the session is over (disconnected, drained or shut down).
        binary: events are encoded as binary frames (docs/wire.md, "Binary frames"). It
            becomes True when the client sends a binary frame (a client sends them only to
            a service that announced :data:`~wove.protocol.CAPABILITY_BINARY_FRAMES`, so a
            Wove 2.x client always gets JSON); a shell that negotiated it another way (a
            handshake header) sets it.
    """

    def __init__(self, service: WorkerService, peer: str = "?",
                 emit: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.service = service
        self.peer = peer
        self.runs: dict[str, tuple[str, bool]] = {}
        self.ended = False
        self.binary = False
        self._pending: list[dict[str, Any]] = []
        self._wake = asyncio.Event()
        self._readable = asyncio.Event()
        self._readable.set()
        self._emit = emit
        self._sink = self._deliver
        self._metrics = service.metrics
        #: run_id -> when its task_started came (None: not yet), for the runs this session
        #: accepted; only kept when the service counts metrics
        self._timing: dict[str, float | None] | None = {} if service.metrics is not None else None

    # -- in ------------------------------------------------------------------
    async def receive(self, data: bytes | bytearray | memoryview | str | SplitFrame, *, strict: bool = False,
                      strict_runs: bool = False) -> None:
        """Take one message: a JSON command, a JSON list of commands, or binary frames
        (one or more, each one command; the session then answers in binary frames).

        Args:
            strict: raise :class:`Rejected` (``bad_request``) for a message that is not
                JSON, or not a command, and names no run (request/response shells answer
                400); otherwise such input is answered with a ``log`` event.
            strict_runs: with ``strict``, a malformed command that names a run is refused
                the same way instead of answered with that run's ``task_error`` (a shell
                that answers each call with one status: gRPC ``Send``/``Stream``).
        """
        if len(data) > self.service.max_command_bytes:
            if strict:
                self.service.check_size(len(data))
            self._too_large(data)
            return
        try:
            parsed = parse_frames(data)
        except ProtocolError as exc:
            self._malformed(exc, strict)
            return
        if not self.binary and is_binary(data):
            self.binary = True
        for command in parsed if isinstance(parsed, list) else (parsed,):
            await self.receive_command(command, strict=strict, strict_runs=strict_runs)

    async def receive_command(self, command: Any, *, strict: bool = False, strict_runs: bool = False) -> None:
        """Take one parsed command (a dict from the JSON): decode, check, run."""
        try:
            frame = decode_command(command)
        except ProtocolError as exc:
            if getattr(exc, "run_id", None) and not (strict and strict_runs):
                self.service.record_rejection("bad_frame")
                self.service.engine.reject(exc, self._sink)
            else:
                self._malformed(exc, strict)
            return
        kind = frame["type"]
        if kind == "run_task":
            await self._run(frame)
        elif kind == "cancel_task":
            self.service.engine.cancel(str(frame["run_id"]))  # task_cancelled goes to the run's own client
        elif kind == "stream_credit":
            self.service.engine.grant(str(frame["run_id"]), frame["credit"])  # a streamed run's consumer took items
        else:
            await self.service._shutdown_command(self, frame)

    async def _run(self, frame: dict[str, Any]) -> None:
        run_id = frame["run_id"]
        service = self.service
        if self.ended:
            return
        if run_id not in self.runs and len(self.runs) >= service.max_runs_per_session:
            service.record_rejection("capacity")
            self._deliver(error_event(
                run_id, frame["task_id"], kind="TooManyRuns", retryable=True, source="executor",
                message=f"Worker {service.name}: this client already has {len(self.runs)} runs in progress "
                f"(max_runs_per_session={service.max_runs_per_session}); run {run_id} was not started. "
                "Lower delivery_max_in_flight or raise the worker's limit.",
            ))
            return
        delivery = frame.get("delivery") or {}
        self.runs[run_id] = (str(delivery.get("delivery_orphan_policy") or "cancel"),
                             delivery.get("delivery_idempotency_key") is not None)
        timing = self._timing
        if timing is not None and run_id not in timing:
            if service.engine.closing:  # the engine answers it WorkerShuttingDown: refused, not accepted
                service.record_rejection("draining")
            else:
                timing[run_id] = None
                self._metrics.run_accepted()  # type: ignore[union-attr]
        await service.engine.submit(frame, self._sink)

    def _too_large(self, data: bytes | bytearray | memoryview | str | SplitFrame) -> None:
        """Refuse an oversized command without decoding it; the run it names (read from the
        head of the JSON, where the codec writes ``run_id`` and ``task_id``) gets the error."""
        message = self.service._too_large_message(len(data))
        if isinstance(data, SplitFrame):  # (its size was checked before its chunks were kept)
            run_id, task_id = (value if isinstance(value := data.header.get(name), str) else None
                               for name in ("run_id", "task_id"))
        else:
            head = bytes(data[:_HEAD]) if not isinstance(data, str) else data[:_HEAD].encode("utf-8", "replace")
            run_id, task_id = (_field(head, name) for name in ("run_id", "task_id"))
        logger.warning("%s worker: refused a command from %s: %s", self.service.name, self.peer, message)
        self.service.record_rejection("too_large")
        if run_id is None:
            self._deliver({"type": "log", "message": f"Worker {self.service.name}: {message}"})
        else:
            self._deliver(error_event(run_id, task_id or run_id.split(":")[0], kind="CommandTooLarge",
                                      message=f"Run {run_id}: {message}", source="executor"))

    def _malformed(self, exc: ProtocolError, strict: bool) -> None:
        self.service.record_rejection("bad_frame")
        if strict:
            raise Rejected("bad_request", f"Not a Wove command: {exc}")
        self.service.engine.reject(exc, self._sink)

    # -- out -----------------------------------------------------------------
    def _deliver(self, event: dict[str, Any]) -> None:
        """The engine's sink for this session's runs (never blocks)."""
        kind = event.get("type")
        if kind in TERMINAL_EVENTS:
            self.runs.pop(event.get("run_id"), None)  # type: ignore[arg-type]
            if self._timing is not None:
                self._count_end(event.get("run_id"), kind)
        elif kind == "task_started" and self._timing is not None:
            run_id = event.get("run_id")
            if run_id in self._timing and self._timing[run_id] is None:
                self._timing[run_id] = time.monotonic()
        if self.ended:
            return
        if self._emit is not None:
            self._emit(event)
            return
        pending = self._pending
        pending.append(event)
        if len(pending) == 1:
            self._wake.set()
        if len(pending) >= self.service.max_pending_events:
            self._readable.clear()

    def _count_end(self, run_id: Any, kind: Any) -> None:
        """A run this session accepted ended with a terminal event: count its outcome and
        execution time (from its task_started)."""
        assert self._timing is not None and self._metrics is not None
        if run_id not in self._timing:
            return
        started = self._timing.pop(run_id)
        self._metrics.run_finished(_OUTCOME[kind], None if started is None else time.monotonic() - started)

    @property
    def events_pending(self) -> bool:
        return bool(self._pending)

    def take_events(self, *, heartbeats: bool = True, superseded: bool = False) -> list[dict[str, Any]]:
        """The events ready for the client, oldest first; a ``task_started`` or
        ``heartbeat`` whose run's terminal event is among them is left out (it says
        nothing the terminal does not) unless ``superseded`` is True (a wire format whose
        answers always carried them: HTTP), and so are heartbeats when ``heartbeats`` is
        False (a shell that answers once, at the end)."""
        events, self._pending = self._pending, []
        self._wake.clear()
        self._readable.set()
        finished = {e.get("run_id") for e in events if e.get("type") in TERMINAL_EVENTS} \
            if len(events) > 1 and not superseded else ()
        if finished or not heartbeats:
            events = [e for e in events if not (
                (e.get("type") in _PROGRESS and e.get("run_id") in finished)
                or (not heartbeats and e.get("type") == "heartbeat"))]
        return events

    def data_to_send(self, framing: Framing = "list", *, heartbeats: bool = True, superseded: bool = False,
                     max_message_bytes: int | None = None, max_events_per_message: int = 64) -> list[bytes]:
        """Encode the ready events as messages (see :data:`Framing`); an event that cannot
        be encoded is a ``task_error`` naming its task (never a lost terminal event).

        ``list`` framing splits into messages of at most ``max_events_per_message`` events
        and, past the first event, ``max_message_bytes``. In a :attr:`binary` session, see
        :meth:`parts_to_send` for which events go as binary frames; each message is joined
        once.
        """
        return [parts[0] if len(parts) == 1 and type(parts[0]) is bytes else b"".join(parts)  # type: ignore[misc]
                for _binary, parts in self.parts_to_send(
                    framing, heartbeats=heartbeats, superseded=superseded, max_message_bytes=max_message_bytes,
                    max_events_per_message=max_events_per_message)]

    def parts_to_send(self, framing: Framing = "list", *, heartbeats: bool = True, superseded: bool = False,
                      max_message_bytes: int | None = None,
                      max_events_per_message: int = 64) -> list[tuple[bool, list[bytes | memoryview]]]:
        """:meth:`data_to_send`, each message as ``(binary, parts)``: whether it is binary
        frames, and its bytes in parts to write in order without joining (a large result's
        buffers are views of it, not copies).

        A :attr:`binary` session sends as binary frames only the events worth it
        (:func:`wove.framing.worth_binary`: a bulky result, item or exception), and the
        others as JSON, which costs less for them; ``list`` framing groups consecutive
        events of one kind into a message (JSON lists, or frames back to back), ``lines``
        puts both kinds in one stream (a reader tells them apart by their first byte), and
        ``envelope`` makes the whole body binary frames when any event is worth it.
        """
        events = self.take_events(heartbeats=heartbeats, superseded=superseded)
        if not events:
            return []
        if not self.binary:
            if framing in ("envelope", "lines"):
                return [(False, [encode_events(events, framing)])]
            encoded = [encode_event(e) for e in events]
            if framing == "each":
                return [(False, [item]) for item in encoded]
            return [(False, [encoded[start] if end - start == 1
                             else b"[" + b",".join(encoded[start:end]) + b"]"])
                    for start, end in self._batches([len(item) for item in encoded], max_message_bytes,
                                                    max_events_per_message)]
        kinds = [worth_binary(e) for e in events]
        if framing == "envelope":
            if not any(kinds):
                return [(False, [encode_events(events, "envelope")])]
            return [(True, [part for e in events for part in encode_event_parts(e)])]
        if framing == "lines":
            parts: list[bytes | memoryview] = []
            for event, binary in zip(events, kinds):
                if binary:
                    parts.extend(encode_event_parts(event))
                else:
                    parts.append(encode_event(event) + b"\n")
            return [(any(kinds), parts)]
        if framing == "each":
            return [(True, encode_event_parts(e)) if binary else (False, [encode_event(e)])
                    for e, binary in zip(events, kinds)]
        messages: list[tuple[bool, list[bytes | memoryview]]] = []
        start = 0
        while start < len(events):  # runs of one kind, each batched as its kind is
            binary = kinds[start]
            end = start + 1
            while end < len(events) and kinds[end] is binary:
                end += 1
            if binary:
                framed = [encode_event_parts(e) for e in events[start:end]]
                sizes = [sum(len(part) for part in frame) for frame in framed]
                messages.extend((True, [part for frame in framed[a:b] for part in frame])
                                for a, b in self._batches(sizes, max_message_bytes, max_events_per_message))
            else:
                encoded = [encode_event(e) for e in events[start:end]]
                messages.extend((False, [encoded[a] if b - a == 1 else b"[" + b",".join(encoded[a:b]) + b"]"])
                                for a, b in self._batches([len(item) for item in encoded], max_message_bytes,
                                                          max_events_per_message))
            start = end
        return messages

    @staticmethod
    def _batches(sizes: list[int], max_bytes: int | None, max_count: int) -> Iterator[tuple[int, int]]:
        """``(start, end)`` of consecutive events per message: at most ``max_count``, and
        past the first, at most ``max_bytes`` (one separator byte each)."""
        start = 0
        while start < len(sizes):
            end, total = start, 0
            while end < len(sizes):
                if end > start and (end - start >= max_count
                                    or (max_bytes is not None and total + sizes[end] > max_bytes)):
                    break
                total += sizes[end] + 1
                end += 1
            yield start, end
            start = end

    async def wait(self) -> None:
        """Until there are events to send or the session ended."""
        if not self._pending and not self.ended:
            await self._wake.wait()

    # -- flow control ------------------------------------------------------------
    @property
    def reading_paused(self) -> bool:
        """True while the client has ``max_pending_events`` events it has not taken."""
        return not self._readable.is_set()

    async def wait_readable(self) -> None:
        """Before reading the next command: wait while the client is not reading events."""
        if not self._readable.is_set():
            await self._readable.wait()

    # -- end -----------------------------------------------------------------
    @property
    def active(self) -> bool:
        """Runs of this session are still in progress."""
        return bool(self.runs)

    def connection_lost(self) -> None:
        """The client went away: the one disconnect rule (module docstring)."""
        if self.ended and not self.runs:
            self._forget()
            return
        engine = self.service.engine
        for run_id, (policy, keyed) in list(self.runs.items()):
            keep = policy in _KEEP_ON_DISCONNECT or keyed
            logger.info("%s worker: client %s left run %s (orphan policy %s%s); %s", self.service.name, self.peer,
                        run_id, policy, ", idempotency key" if keyed else "",
                        "it keeps running for a re-delivery" if keep else "cancelling it")
            engine.unsubscribe(run_id, self._sink, cancel=not keep)
        if self._timing:  # accepted runs that got no terminal event here: kept going, or requeued by the drain
            outcome = "requeued" if self.service.closing else "detached"
            for _ in self._timing:
                self._metrics.run_finished(outcome)  # type: ignore[union-attr]
            self._timing.clear()
        self.runs.clear()
        self._end()
        self._forget()

    def _forget(self) -> None:
        sessions = self.service.sessions
        if self in sessions:
            sessions.discard(self)
            if self._metrics is not None:
                self._metrics.session_closed()

    def _end(self) -> None:
        self.ended = True
        self._wake.set()
        self._readable.set()
