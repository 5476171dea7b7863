"""wove_backend (imported as ``wove.backend`` too): run Wove tasks on an existing distributed engine.

The submitting side (:class:`BackendAdapterEnvironmentExecutor`) turns each ``run_task``
into a JSON-safe *payload* (:func:`build_backend_payload`, the Wove 2.x shape) and hands
it to a :class:`BackendAdapter`, which submits it to the engine. A worker of the engine
runs the payload with :func:`run_backend_payload` (or :func:`run_backend_payload_async`)
and posts the run's events back over HTTP to a :class:`BackendCallbackServer` the
executor runs on its own event loop, at ``/wove/events/<token>`` where the token is
unguessable and per executor. Each payload also carries a per-run ``callback_key``; the
worker signs every callback with it (``X-Wove-Callback-Signature``) and the server
verifies that signature on the raw bytes, and checks that the run is pending, before it
decodes any pickled field: a callback for a run that is not pending is answered 404 and
nothing of it is unpickled. Wove 2.x workers (``wove.integrations.worker.run``) run these
payloads and post to this server unchanged (unsigned: accepted for pending runs unless
``executor_config.require_signed_callbacks`` is true).

Adapters may watch their submissions and call :meth:`BackendAdapter.report_lost` when
the engine lost a run (worker killed, scheduler gone): the executor then re-delivers it
(orphan policy ``requeue``, bounded) or ends it with a ``task_error`` whose source is
``transport``, so no run waits forever for a callback.

Nothing here imports uvicorn, httpx or cloudpickle at import time.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from wove.options import CALLBACK_OPTIONS
from wove.protocol import TERMINAL_EVENTS, ProtocolError, decode_events
from wove.security import is_local_host
from wove.transport import FrameExecutor

from ._callback_server import (
    CALLBACK_RUN_HEADER,
    CALLBACK_SIGNATURE_HEADER,
    DEFAULT_MAX_BODY_BYTES,
    BackendCallbackServer,
    callback_headers,
    new_callback_key,
    sign_callback,
)
from ._polling import FIRST_CHECK_SECONDS, LIVENESS_SECONDS, PolledSubmission, ResultPoller
from ._runner import (
    ENGINE_STATUS_VERSION,
    UNREACHABLE_SECONDS,
    CallbackConnectionPool,
    CallbackUnreachable,
    callback_connections,
    engine_status,
    execute_backend_payload,
    post_event,
    post_events,
    run_backend_payload,
    run_backend_payload_async,
    run_engine_payload,
    run_engine_payload_sync,
)

__all__ = [
    "CALLBACK_RUN_HEADER",
    "CALLBACK_SIGNATURE_HEADER",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_SETTLE_GRACE",
    "ENGINE_STATUS_VERSION",
    "FIRST_CHECK_SECONDS",
    "LIVENESS_SECONDS",
    "UNREACHABLE_SECONDS",
    "BackendAdapter",
    "BackendAdapterEnvironmentExecutor",
    "BackendCallbackServer",
    "CallbackConnectionPool",
    "CallbackUnreachable",
    "PolledSubmission",
    "ResultPoller",
    "build_backend_payload",
    "callback_connections",
    "callback_headers",
    "engine_status",
    "execute_backend_payload",
    "get_backend_adapter_class",
    "new_callback_key",
    "payload_from_b64",
    "payload_to_b64",
    "post_event",
    "post_events",
    "register_backend_adapter",
    "run_backend_payload",
    "run_backend_payload_async",
    "run_engine_payload",
    "run_engine_payload_sync",
    "sign_callback",
]

logger = logging.getLogger("wove.backend")

#: Seconds :meth:`BackendAdapter.settle` waits for a callback the worker says it posted.
DEFAULT_SETTLE_GRACE = 1.0

# -- payloads ----------------------------------------------------------------------------
def build_backend_payload(frame: dict[str, Any], *, callback_url: str, adapter: str,
                          callback_key: str | None = None, result_channel: str = "auto",
                          callback_ca: str | None = None) -> dict[str, Any]:
    """Build the JSON-safe payload a backend worker runs (the Wove 2.x shape).

    Beyond the 2.x fields it carries ``callback_key`` (``callback_key`` or a fresh random
    one): the per-run key the worker signs its callbacks with; ``result_channel`` (how
    the worker returns the outcome, see :func:`execute_backend_payload`); and, with
    ``callback_ca``, the PEM the worker verifies an https callback server with. A run with
    a ``delivery_idempotency_key`` also gets ``keep_outcome``: its engine result carries
    the terminal event even when it was posted, so a later submission with the same key,
    which the engine attaches to this job, gets the outcome from the engine
    (:meth:`BackendAdapter.settle` with ``of_run``). The frame's W3C ``traceparent`` and
    ``tracestate`` (docs/wire.md) are copied when present. Wove 2.x workers ignore these fields.

    Raises:
        DispatchError: the callable or an argument cannot be pickled (names the task and path).
        MissingDispatchFeatureError: cloudpickle is not installed.
    """
    from wove.protocol import pack_frame

    packed = pack_frame({"task_id": frame["task_id"], "callable": frame["callable"], "args": frame["args"]})
    return {
        "version": 1,
        "adapter": adapter,
        "callback_url": callback_url,
        "run_id": frame["run_id"],
        "task_id": frame["task_id"],
        "task_name": frame.get("task_name", frame["task_id"]),
        "callable_pickle": packed["callable_pickle"],
        "args_pickle": packed["args_pickle"],
        "delivery": dict(frame.get("delivery") or {}),
        "callback_key": callback_key or new_callback_key(),
        "result_channel": result_channel,
        **({"callback_ca": callback_ca} if callback_ca else {}),
        **({"keep_outcome": True} if (frame.get("delivery") or {}).get("delivery_idempotency_key") else {}),
        **{key: frame[key] for key in ("traceparent", "tracestate") if isinstance(frame.get(key), str)},
    }


def payload_to_b64(payload: dict[str, Any]) -> str:
    """Encode a payload as one base64 string (for engines that take a string argument)."""
    return base64.b64encode(json.dumps(payload, separators=(",", ":")).encode("utf-8")).decode("ascii")


def payload_from_b64(value: str) -> dict[str, Any]:
    """Inverse of :func:`payload_to_b64`.

    Raises:
        ValueError: ``value`` is not base64 of a JSON object.
    """
    payload = json.loads(base64.b64decode(value.encode("ascii"), validate=True).decode("utf-8"))
    if not isinstance(payload, dict):
        raise ValueError(f"A backend payload must be a JSON object, got {type(payload).__name__}.")
    return payload


# -- adapters ----------------------------------------------------------------------------
class BackendAdapter:
    """Engine-specific submit/cancel bridge used by :class:`BackendAdapterEnvironmentExecutor`.

    Compatible with Wove 2.x adapters. Subclasses set ``required_modules`` (checked
    before start) and ``install_hint`` (what to ``pip install`` when they are missing),
    and may watch submissions: :meth:`report_lost` when the engine lost a run,
    :meth:`report_event` for an event that arrived another way than the callback.
    """

    required_modules: tuple[str, ...] = ()
    install_hint: str | None = None

    def __init__(self, *, name: str, config: dict[str, Any], callback_url: str, run_config: dict[str, Any]) -> None:
        self.name = name
        self.config = config
        self.callback_url = callback_url
        self.run_config = run_config
        self._on_lost: Callable[..., None] | None = None
        self._on_event: Callable[[dict[str, Any]], None] | None = None
        self._is_pending: Callable[[str], bool] = lambda run_id: False

    @classmethod
    def missing_dependencies(cls) -> tuple[str, ...]:
        """The ``required_modules`` that cannot be imported here."""
        return tuple(module for module in cls.required_modules if importlib.util.find_spec(module) is None)

    async def start(self) -> None:
        """Connect to the engine (runs on the runtime's loop; must not block it)."""

    async def submit(self, payload: dict[str, Any], frame: dict[str, Any]) -> Any:
        """Submit ``payload`` (run it with :func:`run_backend_payload`); return a handle."""
        raise NotImplementedError(f"{type(self).__name__}.submit() is not implemented.")

    async def cancel(self, run_id: str, submission: Any, frame: dict[str, Any]) -> None:
        """Cancel a submission (best effort)."""

    async def close(self) -> None:
        """Release engine resources."""

    # -- hooks the executor binds --------------------------------------------------------
    def bind(self, *, on_lost: Callable[..., None],
             on_event: Callable[[dict[str, Any]], None], is_pending: Callable[[str], bool]) -> None:
        """Called by the executor before :meth:`start`."""
        self._on_lost, self._on_event, self._is_pending = on_lost, on_event, is_pending

    def is_pending(self, run_id: str) -> bool:
        """True while ``run_id`` has no terminal event."""
        return self._is_pending(run_id)

    def report_lost(self, run_id: str, reason: str, exc: BaseException | None = None, *,
                    redeliverable: bool = True) -> None:
        """The engine lost ``run_id``: the executor re-delivers it or ends it with a transport error.

        ``redeliverable=False`` ends it with the error even under orphan policy ``requeue``
        (the engine itself is gone, so a re-delivery could not run).
        """
        if self._on_lost is not None:
            if redeliverable:
                self._on_lost(run_id, reason, exc)
            else:
                self._on_lost(run_id, reason, exc, redeliverable=False)

    def report_event(self, event: dict[str, Any]) -> None:
        """Deliver an event (such as a terminal event the worker could not post)."""
        if self._on_event is not None:
            self._on_event(event)

    @property
    def result_channel(self) -> str:
        """``executor_config.result_channel``: ``auto`` (default), ``callback`` or ``engine``."""
        channel = self.config.get("result_channel", "auto")
        return channel if channel in ("auto", "callback", "engine") else "auto"

    async def settle(self, run_id: str, status: Any, *, what: str, grace: float = DEFAULT_SETTLE_GRACE,
                     attached: bool = False) -> None:
        """End ``run_id`` from what its engine task returned (call once the engine says it finished).

        ``status`` is the :func:`engine_status` the worker returned. When it carries the
        terminal event (the callback did not get it, or the payload asked to keep it), the
        event is delivered here: only while the run is pending (nothing is decoded
        otherwise), and only an event of this run, unless ``attached``: the engine job first
        ran for an earlier run, and ``run_id`` attached to it through a repeated
        ``delivery_idempotency_key``; its outcome is then re-addressed to ``run_id``. Anything
        else (the event was posted, or a Wove 2.x worker's return value) waits up to
        ``grace`` seconds for the callback, and otherwise reports the run lost with a
        message naming ``what`` (the engine's task, e.g. ``"Celery task 1f3c..."``).
        """
        if not self.is_pending(run_id):
            return
        if (isinstance(status, dict) and status.get("wove_status") == ENGINE_STATUS_VERSION
                and isinstance(status.get("event"), (str, bytes))):
            try:
                events = decode_events(status["event"])
            except ProtocolError as exc:
                self.report_lost(run_id, f"{self.name} executor: {what} returned an outcome that does not decode: "
                                 f"{exc}", exc, redeliverable=False)
                return
            mine = [event for event in events if attached or event.get("run_id") == run_id]
            if not mine:
                self.report_lost(run_id, f"{self.name} executor: {what} returned an outcome for another run "
                                 f"({sorted({str(e.get('run_id')) for e in events})[:3]}).", redeliverable=False)
            for event in mine:
                event["run_id"] = run_id
                self.report_event(event)
            return
        if attached:
            self.report_lost(run_id, f"{self.name} executor: {what} already ran for an earlier submission with the "
                             "same delivery_idempotency_key, and its result carries no outcome to give this run "
                             "(its worker does not keep outcomes: a Wove 2.x worker?).", redeliverable=False)
            return
        if await self.wait_for_terminal(run_id, grace):
            return
        if isinstance(status, dict) and status.get("posted") is True:
            why = "its worker says it posted the outcome to the callback server, which never received it"
        else:
            why = ("no callback arrived and the engine's result carries no Wove outcome (a Wove 2.x worker, "
                   "which only posts callbacks, that could not reach the callback server?)")
        self.report_lost(run_id, f"{self.name} executor: {what} finished but {why}.")

    async def wait_for_terminal(self, run_id: str, timeout: float) -> bool:
        """Wait (bounded) for ``run_id``'s terminal event; True when it arrived."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self.is_pending(run_id):
            if asyncio.get_running_loop().time() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True


_ADAPTERS: dict[str, type[BackendAdapter]] = {}


def register_backend_adapter(name: str, adapter_class: type[BackendAdapter]) -> None:
    """Make ``BackendAdapterEnvironmentExecutor(name)`` use ``adapter_class``."""
    _ADAPTERS[name] = adapter_class


def get_backend_adapter_class(name: str) -> type[BackendAdapter]:
    """The adapter class registered for ``name`` (directly or by an executor plugin).

    Raises:
        ValueError: no adapter is known under ``name`` (lists the known ones).
    """
    if name in _ADAPTERS:
        return _ADAPTERS[name]
    from wove.registry import build_executor_from_name

    try:
        executor = build_executor_from_name(name)
    except ValueError as exc:
        raise ValueError(f"No backend adapter named {name!r}: {exc}") from exc
    adapter_class = getattr(executor, "_adapter_class", None)
    if not isinstance(executor, BackendAdapterEnvironmentExecutor) or adapter_class is None:
        raise ValueError(f"Executor {name!r} is not a backend adapter executor; "
                         f"known adapters: {sorted(_ADAPTERS) or 'none'}.")
    return adapter_class


def _install(hint: str) -> str:
    """``pip install`` advice for an adapter's ``install_hint`` (a distribution name or requirements)."""
    from wove.registry import install_hint

    return install_hint(hint) if hint.startswith("wove-") and " " not in hint else f"pip install {hint}"


def _read_pem(path: str, key: str, environment: str) -> str:
    try:
        with open(path, encoding="ascii") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"Environment '{environment}': executor_config.{key} {path!r} cannot be read: {exc}.") from exc
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise ValueError(f"Environment '{environment}': executor_config.{key} {path!r} holds no PEM certificate.")
    return text


class BackendAdapterEnvironmentExecutor(FrameExecutor):
    """Submits tasks to an engine through a :class:`BackendAdapter`; events come back over
    an authenticated callback server.

    ``executor_config`` (:data:`wove.options.CALLBACK_OPTIONS`): ``callback_host``
    (default ``127.0.0.1``), ``callback_port`` (default 0), ``callback_url`` (the URL
    workers use when they reach this process through another address),
    ``callback_token`` (default random), ``callback_max_body_bytes``,
    ``require_signed_callbacks`` (default True; set False for Wove 2.x workers, which do
    not sign), ``result_channel`` (``auto``, ``callback`` or ``engine``),
    ``callback_tls_cert_file`` / ``callback_tls_key_file`` (serve HTTPS) and
    ``callback_tls_ca_file`` (the CA workers verify it with, sent in each payload), the
    re-delivery keys, plus the adapter's own keys.

    Args:
        name: the executor name (``"dask"``); used for messages and adapter lookup.
        adapter_class: the adapter; default: the one registered for ``name``.
        required_modules: modules checked at start; default: the adapter's.
    """

    def __init__(self, name: str, adapter_class: type[BackendAdapter] | None = None,
                 required_modules: tuple[str, ...] | None = None) -> None:
        super().__init__()
        self.executor_name = name
        self._name = name
        self._adapter_class = adapter_class
        self._required_modules = required_modules
        self._server: BackendCallbackServer | None = None
        self._adapter: BackendAdapter | None = None
        self._submissions: dict[str, Any] = {}
        self._payloads: dict[str, dict[str, Any]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._result_channel = "auto"
        self._callback_ca: str | None = None

    @property
    def adapter(self) -> BackendAdapter | None:
        """The started adapter (None before start / after stop)."""
        return self._adapter

    async def start(self, *, environment_name: str, environment_config: dict[str, Any],
                    run_config: dict[str, Any]) -> None:
        """Check dependencies, start the callback server, build and start the adapter.

        Raises:
            RuntimeError: a required module is missing (names it and the install command).
            ValueError: no adapter is known for this executor's name, or bad config.
            OSError: the callback address cannot be bound.
        """
        adapter_class = self._adapter_class or get_backend_adapter_class(self._name)
        required = self._required_modules if self._required_modules is not None else adapter_class.required_modules
        hint = adapter_class.install_hint or f"wove-executor-{self._name}"
        missing = [m for m in (*required, "cloudpickle", "uvicorn") if importlib.util.find_spec(m) is None]
        if missing:
            raise RuntimeError(
                f"The {self._name} executor of environment '{environment_name}' needs the module(s) "
                f"{', '.join(repr(m) for m in missing)}, which are not installed. Install with: {_install(hint)}"
            )
        config = dict(environment_config)
        self._open_events(environment_name, config)
        callback = CALLBACK_OPTIONS.validate({k: v for k, v in config.items() if k in CALLBACK_OPTIONS},
                                             environment=environment_name)
        host = callback["callback_host"]
        public = callback["callback_url"]
        if public is not None and urlsplit(str(public)).scheme not in ("http", "https"):
            raise ValueError(f"Environment '{environment_name}': executor_config.callback_url must be an "
                             f"http(s) URL, got {public!r}.")
        cert, key_file, ca_file = (callback["callback_tls_cert_file"], callback["callback_tls_key_file"],
                                   callback["callback_tls_ca_file"])
        if (key_file or ca_file) and not cert:
            raise ValueError(f"Environment '{environment_name}': executor_config.callback_tls_key_file and "
                             "callback_tls_ca_file need callback_tls_cert_file (the certificate the callback "
                             "server serves HTTPS with).")
        self._result_channel = callback["result_channel"]
        self._callback_ca = _read_pem(ca_file, "callback_tls_ca_file", environment_name) if ca_file else None
        server = BackendCallbackServer(
            host=str(host), port=int(callback["callback_port"]), public_url=public,
            token=callback["callback_token"],
            max_body_bytes=int(callback["callback_max_body_bytes"] or DEFAULT_MAX_BODY_BYTES),
            on_events=self._on_callback,
            is_pending=lambda run_id: run_id in self._inflight,
            run_key=self._callback_key,
            require_signature=callback["require_signed_callbacks"],
            ssl_certfile=cert, ssl_keyfile=key_file,
        )
        if not is_local_host(str(host)) and not cert:
            logger.warning("environment %s: the backend callback server listens on %s over plain HTTP; callbacks "
                           "are signed per run, but results travel unencrypted: keep that network private or set "
                           "executor_config.callback_tls_cert_file.", environment_name, host)
        await server.start()
        assert server.callback_url is not None
        adapter = adapter_class(name=self._name, config=config, callback_url=server.callback_url,
                                run_config=run_config)
        if isinstance(adapter, BackendAdapter):
            adapter.bind(on_lost=self._on_lost, on_event=self._on_adapter_event,
                         is_pending=lambda run_id: run_id in self._inflight)
        try:
            await adapter.start()
        except BaseException:
            await server.stop()
            raise
        self._server, self._adapter = server, adapter

    async def send(self, frame: dict[str, Any]) -> None:
        """Submit a ``run_task``, cancel a run, or accept ``shutdown``.

        Raises:
            RuntimeError: not started.
            ValueError: unknown frame type.
            DispatchError: the task's callable or arguments cannot be pickled.
        """
        self._require_started()
        if self._adapter is None or self._server is None or self._server.callback_url is None:
            raise RuntimeError(f"{self._name} executor for environment '{self._environment}' is not started.")
        frame_type = frame.get("type")
        if frame_type == "run_task":
            payload = build_backend_payload(frame, callback_url=self._server.callback_url, adapter=self._name,
                                            result_channel=self._result_channel, callback_ca=self._callback_ca)
            run_id = str(frame["run_id"])
            self._payloads[run_id] = payload
            self._track(frame)  # before submitting: the worker may answer at once
            await self._call_submit(run_id, payload, frame)
        elif frame_type == "cancel_task":
            run_id = str(frame.get("run_id"))
            entry = self._inflight.get(run_id)
            if entry is None:
                return
            try:
                await self._adapter.cancel(run_id, self._submissions.get(run_id), frame)
            except Exception as exc:
                logger.warning("%s: cancelling run %s on the backend failed: %r", self._name, run_id, exc)
            self._emit({"type": "task_cancelled", "run_id": run_id, "task_id": entry.frame["task_id"]})
        elif frame_type == "shutdown":
            return  # the runtime already sent cancel_task for the runs it orphans
        else:
            raise ValueError(f"{self._name} executor: unknown command type {frame_type!r}; "
                             "expected run_task, cancel_task or shutdown.")

    async def _redeliver(self, run_id: str) -> None:
        entry = self._inflight.get(run_id)
        payload = self._payloads.get(run_id)
        if entry is None or payload is None or self._adapter is None:
            return
        self._track(entry.frame)
        await self._call_submit(run_id, {**payload, "attempt": entry.deliveries}, entry.frame)

    async def _call_submit(self, run_id: str, payload: dict[str, Any], frame: dict[str, Any]) -> None:
        assert self._adapter is not None
        try:
            submission = await self._adapter.submit(payload, frame)
            if run_id in self._inflight:
                self._submissions[run_id] = submission
            # else: the run ended while it was being submitted (an outcome the engine already
            # held, a cancel): keep no handle of it
        except Exception as exc:
            self._on_lost(run_id, f"{self._name} executor for environment '{self._environment}' could not "
                          f"submit run {run_id}: {type(exc).__name__}: {exc}", exc, redeliverable=False)

    def _callback_key(self, run_id: str) -> str | None:
        payload = self._payloads.get(run_id)
        key = payload.get("callback_key") if payload is not None else None
        return key if isinstance(key, str) else None

    def _on_callback(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            self._on_adapter_event(event)

    def _on_adapter_event(self, event: dict[str, Any]) -> None:
        run_id = str(event.get("run_id"))
        if event.get("type") != "log" and run_id not in self._inflight:
            logger.debug("%s: %s for finished or unknown run %s dropped", self._name, event.get("type"), run_id)
            return
        self._emit(event)
        if event.get("type") in TERMINAL_EVENTS:
            self._submissions.pop(run_id, None)
            self._payloads.pop(run_id, None)

    def _on_lost(self, run_id: str, reason: str, exc: BaseException | None = None, *,
                 redeliverable: bool = True) -> None:
        if run_id not in self._inflight:
            return
        if self._lost(run_id, reason, exc, redeliverable=redeliverable):
            task = asyncio.ensure_future(self._redeliver(run_id))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        else:
            self._submissions.pop(run_id, None)
            self._payloads.pop(run_id, None)

    async def stop(self) -> None:
        """Close the adapter and the callback server (bounded)."""
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        try:
            if self._adapter is not None:
                await self._adapter.close()
        finally:
            if self._server is not None:
                await self._server.stop()
            self._adapter = self._server = None
            self._submissions.clear()
            self._payloads.clear()
            self._inflight.clear()
