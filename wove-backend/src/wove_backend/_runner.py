"""The worker side of backend adapters: run a payload, post its events (keep-alive HTTP).

Runs inside an engine's worker process (Dask, ...); ``wove.integrations.worker.run`` and
``python -m wove.backend_worker`` (the Wove 2.x entry points) call it. A payload runs in
the one :class:`~wove.worker.WorkerEngine` every worker service uses; a sink posts the
run's events to the callback URL. Public names are re-exported by :mod:`wove_backend`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import http.client
import logging
import os
import re
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from wove.protocol import TERMINAL_EVENTS, encode_event, error_event
from wove.session import Rejected, WorkerService
from wove.worker import WorkerEngine, shared_threads

from ._callback_server import callback_headers, redact_callback_url

__all__ = [
    "ENGINE_STATUS_VERSION",
    "UNREACHABLE_SECONDS",
    "CallbackConnectionPool",
    "CallbackUnreachable",
    "callback_connections",
    "engine_status",
    "execute_backend_payload",
    "post_event",
    "post_events",
    "run_backend_payload",
    "run_backend_payload_async",
    "run_engine_payload",
    "run_engine_payload_sync",
]

logger = logging.getLogger("wove.backend")

#: Seconds a worker waits for one callback POST.
POST_TIMEOUT = 30.0
#: A run that finishes within this many seconds posts only its terminal event (one request
#: instead of two); a longer one posts ``task_started`` first.
STARTED_DELAY = 0.05
#: Delays between attempts to post a terminal event (then the worker gives up).
TERMINAL_POST_RETRIES = (0.2, 1.0)


#: Seconds an idle keep-alive callback connection may wait for reuse (below uvicorn's
#: default keep-alive of 5 s, so a proxy or server closing idle connections rarely races us).
KEEPALIVE_IDLE_SECONDS = 4.0
#: Idle connections kept per callback server and worker process.
KEEPALIVE_MAX_IDLE = 8
#: (scheme, host, port, CA PEM or None)
_PoolKey = tuple[str, str, int, "str | None"]
_STALE_ERRORS = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                 ConnectionAbortedError)


class CallbackConnectionPool:
    """Thread-safe keep-alive HTTP(S) connections to callback servers, per worker process.

    Connections are keyed by ``(scheme, host, port)``; a POST reuses an idle one (idle
    less than :data:`KEEPALIVE_IDLE_SECONDS`) or opens a new one. A reused connection the
    server already closed is detected when the request fails before any answer and the
    request is sent once more on a fresh connection (a duplicate event, in the rare case
    the server did read it, is dropped by the executor). When ``urllib`` would route the
    URL through a proxy (``http_proxy`` & co.), the POST goes through ``urllib`` as in
    Wove 2.x. After a ``fork`` the child starts with an empty pool.
    """

    def __init__(self, max_idle: int = KEEPALIVE_MAX_IDLE, idle_seconds: float = KEEPALIVE_IDLE_SECONDS) -> None:
        self.max_idle = max_idle
        self.idle_seconds = idle_seconds
        self._lock = threading.Lock()
        self._idle: dict[_PoolKey, list[tuple[float, http.client.HTTPConnection]]] = {}
        self._proxied: dict[_PoolKey, bool] = {}
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._pid = os.getpid()
        #: Connections opened so far (for tests and diagnostics).
        self.opened = 0

    def post(self, url: str, body: bytes, timeout: float, headers: dict[str, str] | None = None,
             ca: str | None = None) -> bytes:
        """POST ``body`` (JSON) to ``url`` with extra ``headers``; return the response body.

        ``ca`` (PEM text) verifies an ``https`` callback server instead of the system's CAs.

        Raises:
            urllib.error.HTTPError: the server answered with a status of 400 or more.
            OSError: the server could not be reached, or the connection broke.
        """
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise urllib.error.URLError(f"callback URL {redact_callback_url(url)!r} is not an http(s) URL")
        key = (scheme, parts.hostname, parts.port or (443 if scheme == "https" else 80), ca)
        if ca is None and self._uses_proxy(key, url):
            return _urllib_post(url, body, timeout, headers)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        all_headers = {"Content-Type": "application/json", "Content-Length": str(len(body)), **(headers or {})}
        while True:
            conn, reused = self._checkout(key, timeout)
            try:
                if conn.sock is not None:
                    conn.sock.settimeout(timeout)
                conn.request("POST", target, body=body, headers=all_headers)
                response = conn.getresponse()
                data = response.read()
            except _STALE_ERRORS:
                conn.close()
                if reused:
                    continue  # the server closed this idle connection: retry on a fresh one
                raise
            except http.client.HTTPException as exc:
                conn.close()
                raise urllib.error.URLError(f"bad HTTP answer from {redact_callback_url(url)}: {exc!r}") from exc
            except BaseException:
                conn.close()
                raise
            if response.will_close:
                conn.close()
            else:
                self._checkin(key, conn)
            if response.status >= 400:
                raise urllib.error.HTTPError(redact_callback_url(url), response.status,
                                             f"{response.reason}: {data[:200].decode('utf-8', 'replace')}",
                                             response.headers, None)
            return data

    def _uses_proxy(self, key: _PoolKey, url: str) -> bool:
        known = self._proxied.get(key)
        if known is None:
            proxies = urllib.request.getproxies()
            known = key[0] in proxies and not urllib.request.proxy_bypass(key[1])
            self._proxied[key] = known
        return known

    def _checkout(self, key: _PoolKey, timeout: float) -> tuple[http.client.HTTPConnection, bool]:
        now = time.monotonic()
        with self._lock:
            if self._pid != os.getpid():  # forked: the parent's sockets are not ours
                self._idle, self._pid = {}, os.getpid()
            idle = self._idle.get(key)
            while idle:
                since, conn = idle.pop()
                if now - since < self.idle_seconds:
                    return conn, True
                conn.close()
            self.opened += 1
        if key[0] == "https":
            context = None
            if key[3] is not None:
                with self._lock:
                    context = self._contexts.get(key[3])
                    if context is None:
                        context = self._contexts[key[3]] = ssl.create_default_context(cadata=key[3])
            return http.client.HTTPSConnection(key[1], key[2], timeout=timeout, context=context), False
        return http.client.HTTPConnection(key[1], key[2], timeout=timeout), False

    def _checkin(self, key: _PoolKey, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < self.max_idle and self._pid == os.getpid():
                idle.append((time.monotonic(), conn))
                return
        conn.close()

    def close(self) -> None:
        """Close every idle connection."""
        with self._lock:
            idle, self._idle = self._idle, {}
        for entries in idle.values():
            for _since, conn in entries:
                conn.close()


def _urllib_post(url: str, body: bytes, timeout: float, headers: dict[str, str] | None = None) -> bytes:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        data: bytes = response.read()
    return data


#: The worker process's callback connections (see :class:`CallbackConnectionPool`).
callback_connections = CallbackConnectionPool()


def post_event(callback_url: str, frame: dict[str, Any], timeout: float | None = None, *,
               key: str | None = None, ca: str | None = None) -> None:
    """POST one event to ``callback_url`` (synchronous, thread-safe; stdlib only).

    Uses the process's keep-alive :data:`callback_connections`. The result and exception
    travel as pickled fields; a result that cannot be pickled is sent as a ``task_error``
    instead (see :func:`wove.protocol.encode_event`). With ``key`` (the payload's
    ``callback_key``) the request is signed for the event's run; ``ca`` (PEM text, the
    payload's ``callback_ca``) verifies an https callback server.

    Raises:
        OSError: the callback server could not be reached or answered with an error status
            (``urllib.error.HTTPError`` / ``URLError``).
    """
    body = encode_event(frame)
    headers = callback_headers(key, str(frame.get("run_id")), body) if key else None
    callback_connections.post(callback_url, body, POST_TIMEOUT if timeout is None else timeout, headers, ca)


def post_events(callback_url: str, frames: list[dict[str, Any]], timeout: float | None = None, *,
                key: str | None = None, ca: str | None = None) -> None:
    """POST several events in one request (a JSON list body, which the callback server accepts).

    With ``key`` the request is signed; every frame must then belong to one run.

    Raises:
        OSError: as :func:`post_event`.
        ValueError: ``key`` is given and the frames name more than one run.
    """
    body = b"[" + b",".join(encode_event(frame) for frame in frames) + b"]"
    headers = None
    if key:
        runs = {str(frame.get("run_id")) for frame in frames}
        if len(runs) != 1:
            raise ValueError(f"post_events(key=...) signs the events of one run; got runs {sorted(runs)[:5]}.")
        headers = callback_headers(key, runs.pop(), body)
    callback_connections.post(callback_url, body, POST_TIMEOUT if timeout is None else timeout, headers, ca)


def _definitive(exc: OSError) -> bool:
    """A 4xx answer: the server understood and refused; posting again cannot help."""
    return isinstance(exc, urllib.error.HTTPError) and 400 <= exc.code < 500


#: Seconds a worker process skips posting to a callback server it could not reach (under
#: ``result_channel`` auto/engine the outcome then travels in the engine's own result).
UNREACHABLE_SECONDS = 30.0
_unreachable: dict[str, float] = {}
_RESULT_CHANNELS = ("auto", "callback", "engine")


class CallbackUnreachable(OSError):
    """The callback server was not reachable from this worker process a moment ago."""


class _Callback:
    """Where one run's events go: URL, signing key, CA and the payload's ``result_channel``."""

    def __init__(self, payload: dict[str, Any]) -> None:
        self.url: str = payload["callback_url"]
        key, ca = payload.get("callback_key"), payload.get("callback_ca")
        self.key = key if isinstance(key, str) else None
        self.ca = ca if isinstance(ca, str) else None
        channel = payload.get("result_channel", "callback")
        # a Wove 2.x payload has no result_channel: its caller only listens to the callback
        self.channel = channel if channel in _RESULT_CHANNELS else "callback"
        parts = urlsplit(self.url)
        self._origin = f"{parts.scheme}://{parts.netloc}"

    @property
    def reachable(self) -> bool:
        """False while this process recently failed to reach the server (auto/engine only)."""
        if self.channel == "callback":
            return True
        until = _unreachable.get(self._origin)
        if until is None:
            return True
        if time.monotonic() >= until:
            _unreachable.pop(self._origin, None)
            return True
        return False

    async def post(self, frame: dict[str, Any]) -> None:
        """Post one event (in a thread).

        Raises:
            CallbackUnreachable: skipped, the server was unreachable a moment ago.
            OSError: as :func:`post_event`.
        """
        if not self.reachable:
            raise CallbackUnreachable(f"callback server {redact_callback_url(self.url)} was unreachable "
                                      f"within the last {UNREACHABLE_SECONDS:g} s")
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, functools.partial(post_event, self.url, frame, key=self.key, ca=self.ca))
        except OSError as exc:
            if self.channel != "callback" and not isinstance(exc, urllib.error.HTTPError):
                if _unreachable.get(self._origin) is None:
                    logger.info("callback server %s is unreachable from this worker (%r); outcomes travel in "
                                "the engine's own results for %g s", redact_callback_url(self.url), exc,
                                UNREACHABLE_SECONDS)
                _unreachable[self._origin] = time.monotonic() + UNREACHABLE_SECONDS
            raise

    async def post_terminal(self, frame: dict[str, Any]) -> bool:
        """Post the terminal event; False when it did not reach the caller.

        ``callback`` retries connection errors (:data:`TERMINAL_POST_RETRIES`); ``auto`` tries
        once (the engine's own result is the fallback); ``engine`` does not post.
        """
        if self.channel == "engine":
            return False
        retries = TERMINAL_POST_RETRIES if self.channel == "callback" else ()
        for attempt, delay in enumerate((*retries, None)):
            try:
                await self.post(frame)
                return True
            except OSError as exc:
                if isinstance(exc, urllib.error.HTTPError) and exc.code == 404:
                    # Usually: the caller no longer waits for this run (it finished, was cancelled
                    # or timed out). Not posted: an engine adapter may still deliver it its own way.
                    logger.info("%s for run %s refused by %s (404, not retried): %s", frame.get("type"),
                                frame.get("run_id"), redact_callback_url(self.url), exc)
                    return False
                if self.channel != "callback" and not isinstance(exc, urllib.error.HTTPError):
                    return False  # the engine's own result carries it
                if _definitive(exc) or delay is None:
                    logger.error("could not post %s for run %s to %s after %d attempts: %r",
                                 frame.get("type"), frame.get("run_id"), redact_callback_url(self.url),
                                 attempt + 1, exc)
                    return False
                await asyncio.sleep(delay)
        return False  # pragma: no cover


class _CallbackSink:
    """The sink of one run in the :class:`~wove.worker.WorkerEngine`: posts its events.

    Never blocks (the engine calls it on the loop): ``task_started`` is posted after a short
    delay unless the run ended first (a quick run posts only its terminal event),
    heartbeats are posted as they come (and stop once the server refused one with a 4xx),
    and the terminal event resolves :attr:`terminal` for :func:`execute_backend_payload`
    to post (with retries).
    """

    def __init__(self, callback: _Callback, run_id: str, started_delay: float) -> None:
        self.callback, self.url, self.run_id = callback, callback.url, run_id
        self.loop = asyncio.get_running_loop()
        self.terminal: asyncio.Future[dict[str, Any]] = self.loop.create_future()
        self.started: list[asyncio.Future[None]] = []
        self._started_delay = started_delay
        self._started_timer: asyncio.TimerHandle | None = None
        self._beats_refused = False
        self._closed = False
        #: called when the callback server answers a heartbeat 404 (nobody waits for the run)
        self.on_abandoned: Callable[[], object] | None = None
        #: the last log event's post (they go one after another, and before the terminal)
        self.logs: asyncio.Future[None] | None = None

    def __call__(self, event: dict[str, Any]) -> None:
        if self._closed:
            return
        kind = event.get("type")
        if kind in TERMINAL_EVENTS:
            self.close()
            self.terminal.set_result(event)
        elif kind == "task_started":
            if self._started_timer is None and not self.started:
                self._started_timer = self.loop.call_later(self._started_delay, self._post_started, event)
        elif kind == "heartbeat":
            if not self._beats_refused and self.callback.reachable:
                asyncio.ensure_future(self._post_heartbeat(event))
        else:  # a log event (a run's output): in order, and before the terminal event (_finish)
            self.logs = asyncio.ensure_future(self._post_log(self.logs, event))

    async def _post_log(self, previous: asyncio.Future[None] | None, event: dict[str, Any]) -> None:
        if previous is not None:
            await asyncio.wait([previous])
        await self._post_quietly(event)

    def close(self) -> None:
        """Take no more events; a ``task_started`` not posted yet is not posted."""
        self._closed = True
        if self._started_timer is not None:
            self._started_timer.cancel()

    def _post_started(self, event: dict[str, Any]) -> None:
        if not self._closed and self.callback.reachable:
            self.started.append(asyncio.ensure_future(self.callback.post(event)))

    async def _post_heartbeat(self, event: dict[str, Any]) -> None:
        try:
            await self.callback.post(event)
        except CallbackUnreachable:
            pass
        except OSError as exc:
            if self.callback.channel != "callback" and not isinstance(exc, urllib.error.HTTPError):
                return  # said once by _Callback.post
            if _definitive(exc):
                abandoned = isinstance(exc, urllib.error.HTTPError) and exc.code == 404
                if not self._beats_refused:
                    logger.info("heartbeats for run %s stop: %s refused them: %r%s", self.run_id,
                                redact_callback_url(self.url), exc,
                                "; the caller no longer waits for it, so it is cancelled"
                                if abandoned and self.on_abandoned is not None else "")
                self._beats_refused = True
                if abandoned and self.on_abandoned is not None and not self._closed:
                    self.on_abandoned()
            else:
                logger.warning("heartbeat for run %s not delivered to %s: %r", self.run_id,
                               redact_callback_url(self.url), exc)

    async def _post_quietly(self, event: dict[str, Any]) -> None:
        try:
            await self.callback.post(event)
        except CallbackUnreachable:
            pass
        except OSError as exc:
            logger.warning("%s event of run %s not delivered to %s: %r", event.get("type"), self.run_id,
                           redact_callback_url(self.url), exc)


#: An engine name a payload's ``adapter`` may give the worker (anything else: plain ``backend``).
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _worker_name(payload: dict[str, Any]) -> str:
    """The worker engine's name for ``payload``: ``backend:<adapter>`` (``backend:rq``...:
    the payload's ``adapter``, the engine that delivered it), else ``backend``. Observers
    see it as ``ExecutionInfo.worker`` (wove-otel's ``messaging.system`` on the worker)."""
    adapter = payload.get("adapter")
    if isinstance(adapter, str) and _ADAPTER_NAME.fullmatch(adapter):
        return f"backend:{adapter}"
    return "backend"


async def execute_backend_payload(
    payload: dict[str, Any],
    *,
    cancel_event: asyncio.Event | None = None,
    executor: concurrent.futures.Executor | None = None,
) -> tuple[dict[str, Any], bool]:
    """Run a payload through a :class:`~wove.worker.WorkerEngine`, posting its events;
    return ``(terminal_event, posted)``.

    The payload becomes the ``run_task`` frame it carries and runs in the same worker
    engine as every worker service: ``task_started`` is posted (only for a run longer than
    50 ms), heartbeats every third of ``delivery_heartbeat_seconds`` (from a timer, so a
    busy sync task still proves liveness), then exactly one terminal event. Each callback
    is signed with the payload's ``callback_key``. Sync callables run in ``executor`` (a
    :class:`concurrent.futures.Executor`, such as an engine worker's own thread pool;
    default: this process's shared daemon threads, :func:`wove.worker.shared_threads`).
    Setting ``cancel_event`` cancels the run (an async task stops; a sync one is
    abandoned) and posts ``task_cancelled``. ``posted`` is
    False when the terminal event did not reach the caller (a 4xx answer is not retried),
    so an engine adapter can deliver it another way (:func:`run_engine_payload`).

    The payload's ``result_channel`` decides the terminal event's way: ``callback`` (and a
    Wove 2.x payload, which has none) posts it, retrying connection errors twice; ``auto``
    posts it once and, when the server cannot be reached, leaves it to the engine (this
    process then skips that server for :data:`UNREACHABLE_SECONDS`, heartbeats included);
    ``engine`` never posts it (``task_started``, heartbeats and output still go to the
    callback while it is reachable). A heartbeat the callback server answers with 404 (the
    caller no longer waits for the run: it timed out or was cancelled) cancels the run
    here, whatever the engine can cancel itself; except a run with ``keep_outcome``, whose
    engine job may serve a later run with the same idempotency key.

    Raises:
        ValueError: the payload lacks ``callback_url``, ``run_id`` or ``task_id``.
    """
    if not isinstance(payload, dict):
        raise ValueError(f"A backend payload must be a dict, got {type(payload).__name__}.")
    missing = [key for key in ("callback_url", "run_id", "task_id") if not isinstance(payload.get(key), str)]
    if missing:
        raise ValueError(f"Backend payload lacks the string field(s) {missing}; it cannot be run or answered.")
    url, run_id, task_id = payload["callback_url"], payload["run_id"], payload["task_id"]
    delivery = payload.get("delivery")
    interval = delivery.get("delivery_heartbeat_seconds") if isinstance(delivery, dict) else None
    delay = STARTED_DELAY
    if isinstance(interval, (int, float)) and not isinstance(interval, bool) and interval > 0:
        delay = min(delay, float(interval) / 6.0)
    sink = _CallbackSink(_Callback(payload), run_id, delay)
    # One run per engine: the engine that submitted the payload owns concurrency and
    # re-delivery, so nothing is cached here. The session decodes and dispatches the run
    # exactly as every worker service does (its one client, the payload, owns it).
    engine = WorkerEngine(max_concurrency=1, max_queued=0, idempotency_cache_size=0,
                          remember_run_ids=False, name=_worker_name(payload),
                          threads=executor if executor is not None else shared_threads())
    if payload.get("keep_outcome") is not True:  # a keyed run's job may serve later runs too
        sink.on_abandoned = functools.partial(engine.cancel, run_id)
    session = WorkerService(engine, name="backend", exclusive=True).session(redact_callback_url(url), emit=sink)
    command: dict[str, Any] = {"type": "run_task", "run_id": run_id, "task_id": task_id}
    command.update((field, payload[field]) for field in ("task_name", "callable_pickle", "args_pickle", "delivery",
                                                         "traceparent", "tracestate") if field in payload)
    cancelled: asyncio.Future[Any] | None = None
    try:
        try:
            await session.receive_command(command, strict=True)
        except Rejected as exc:
            sink(error_event(run_id, task_id, kind="ProtocolError", source="executor",
                             message=f"Backend payload for run {run_id} is not a valid command: {exc}"))
        waiters: set[asyncio.Future[Any]] = {sink.terminal}
        if cancel_event is not None:
            cancelled = asyncio.ensure_future(cancel_event.wait())
            waiters.add(cancelled)
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if not sink.terminal.done():
            engine.cancel(run_id)  # the engine reports task_cancelled to the sink
        event = await sink.terminal
    except asyncio.CancelledError:
        # The engine itself stopped this run (worker shutting down): say so rather than go silent.
        sink.close()
        engine.cancel(run_id)
        event = error_event(run_id, task_id, kind="WorkerStopped", source="transport", retryable=True,
                            message=f"The backend worker stopped run {run_id} before it finished.")
        await asyncio.shield(_finish(sink, event))
        raise
    finally:
        if cancelled is not None:
            cancelled.cancel()
        await engine.aclose()  # releases its threads: a sync call still running is abandoned
    posted = await _finish(sink, event)
    return event, posted


async def _finish(sink: _CallbackSink, event: dict[str, Any]) -> bool:
    if sink.logs is not None:  # the run's output reaches the caller before its terminal event
        await asyncio.wait([sink.logs], timeout=POST_TIMEOUT)
    for post in sink.started:
        try:
            await post  # task_started goes first
        except CallbackUnreachable:
            pass
        except OSError as exc:
            logger.warning("task_started for run %s not delivered to %s: %r", event.get("run_id"),
                           redact_callback_url(sink.url), exc)
    return await sink.callback.post_terminal(event)


ENGINE_STATUS_VERSION = 1


def engine_status(event: dict[str, Any], posted: bool, *, keep: bool = False) -> dict[str, Any]:
    """The JSON-safe value an engine task returns for a run it executed.

    ``{"wove_status": 1, "posted": True, "type": ...}`` when the terminal event reached the
    caller through the callback, else ``{"wove_status": 1, "posted": False, "event": <the
    encoded terminal event as JSON text>}``: the submitting side gives it to
    :meth:`wove_backend.BackendAdapter.settle`, which delivers the event itself. With
    ``keep`` (the payload's ``keep_outcome``: a run with an idempotency key) the event is
    carried even when it was posted. The result travels pickled inside the event, as on
    the wire.
    """
    status: dict[str, Any] = {"wove_status": ENGINE_STATUS_VERSION, "posted": posted, "type": event.get("type"),
                              "run_id": event.get("run_id")}
    if keep or not posted:
        status["event"] = encode_event(event).decode("utf-8")
    return status


async def run_engine_payload(
    payload: dict[str, Any],
    *,
    cancel_event: asyncio.Event | None = None,
    executor: concurrent.futures.Executor | None = None,
) -> dict[str, Any]:
    """Run a payload inside an engine's task (on a running loop); return its :func:`engine_status`.

    The engine stores the returned status as the task's result, so the run's outcome comes
    back through the engine's own channel when the callback server cannot be reached (see
    ``result_channel`` in :func:`execute_backend_payload`).

    Raises:
        ValueError: the payload lacks ``callback_url``, ``run_id`` or ``task_id``.
    """
    event, posted = await execute_backend_payload(payload, cancel_event=cancel_event, executor=executor)
    return engine_status(event, posted, keep=payload.get("keep_outcome") is True)


def run_engine_payload_sync(payload: dict[str, Any]) -> dict[str, Any]:
    """:func:`run_engine_payload` for engines that call a plain function (no running loop there).

    Each thread keeps one event loop for the payloads it runs (see :func:`_thread_loop`).

    Raises:
        RuntimeError: called on a thread with a running event loop; await
            :func:`run_engine_payload` there.
        ValueError: the payload lacks ``callback_url``, ``run_id`` or ``task_id``.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _thread_loop().run_until_complete(run_engine_payload(payload))
    raise RuntimeError("run_engine_payload_sync() was called inside a running event loop; "
                       "await run_engine_payload(payload) instead.")


_thread_state = threading.local()


def _thread_loop() -> asyncio.AbstractEventLoop:
    """This thread's event loop for :func:`run_engine_payload_sync`, kept between calls.

    An engine worker thread (a Celery or RQ worker, a Ray task thread) runs one payload
    after another: one loop and its default thread pool (which posts the callbacks) per
    thread, not a new pair per payload. A forked child makes its own.
    """
    loop: asyncio.AbstractEventLoop | None = getattr(_thread_state, "loop", None)
    if loop is None or loop.is_closed() or getattr(_thread_state, "pid", None) != os.getpid():
        loop = asyncio.new_event_loop()
        _thread_state.loop, _thread_state.pid = loop, os.getpid()
    return loop


async def run_backend_payload_async(payload: dict[str, Any]) -> Any:
    """Worker entry point on a running loop: run ``payload`` and post its events.

    Returns the task's result, or the terminal event frame when the task did not succeed
    (as Wove 2.x does).

    Raises:
        ValueError: the payload lacks ``callback_url``, ``run_id`` or ``task_id``.
    """
    event, _posted = await execute_backend_payload(payload)
    return event["result"] if event["type"] == "task_result" else event


def run_backend_payload(payload: dict[str, Any]) -> Any:
    """Synchronous worker entry point (for engines that call a plain function).

    Raises:
        RuntimeError: called on a thread with a running event loop; use
            :func:`run_backend_payload_async` there.
        ValueError: the payload lacks ``callback_url``, ``run_id`` or ``task_id``.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(run_backend_payload_async(payload))
    raise RuntimeError("run_backend_payload() was called inside a running event loop; "
                       "await run_backend_payload_async(payload) instead.")


