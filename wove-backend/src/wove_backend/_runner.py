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
import threading
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from wove.protocol import TERMINAL_EVENTS, encode_event, error_event
from wove.session import Rejected, WorkerService
from wove.worker import WorkerEngine

from ._callback_server import callback_headers, redact_callback_url

__all__ = [
    "CallbackConnectionPool",
    "callback_connections",
    "execute_backend_payload",
    "post_event",
    "post_events",
    "run_backend_payload",
    "run_backend_payload_async",
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
        self._idle: dict[tuple[str, str, int], list[tuple[float, http.client.HTTPConnection]]] = {}
        self._proxied: dict[tuple[str, str, int], bool] = {}
        self._pid = os.getpid()
        #: Connections opened so far (for tests and diagnostics).
        self.opened = 0

    def post(self, url: str, body: bytes, timeout: float, headers: dict[str, str] | None = None) -> bytes:
        """POST ``body`` (JSON) to ``url`` with extra ``headers``; return the response body.

        Raises:
            urllib.error.HTTPError: the server answered with a status of 400 or more.
            OSError: the server could not be reached, or the connection broke.
        """
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise urllib.error.URLError(f"callback URL {redact_callback_url(url)!r} is not an http(s) URL")
        key = (scheme, parts.hostname, parts.port or (443 if scheme == "https" else 80))
        if self._uses_proxy(key, url):
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

    def _uses_proxy(self, key: tuple[str, str, int], url: str) -> bool:
        known = self._proxied.get(key)
        if known is None:
            proxies = urllib.request.getproxies()
            known = key[0] in proxies and not urllib.request.proxy_bypass(key[1])
            self._proxied[key] = known
        return known

    def _checkout(self, key: tuple[str, str, int], timeout: float) -> tuple[http.client.HTTPConnection, bool]:
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
            return http.client.HTTPSConnection(key[1], key[2], timeout=timeout), False
        return http.client.HTTPConnection(key[1], key[2], timeout=timeout), False

    def _checkin(self, key: tuple[str, str, int], conn: http.client.HTTPConnection) -> None:
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
               key: str | None = None) -> None:
    """POST one event to ``callback_url`` (synchronous, thread-safe; stdlib only).

    Uses the process's keep-alive :data:`callback_connections`. The result and exception
    travel as pickled fields; a result that cannot be pickled is sent as a ``task_error``
    instead (see :func:`wove.protocol.encode_event`). With ``key`` (the payload's
    ``callback_key``) the request is signed for the event's run.

    Raises:
        OSError: the callback server could not be reached or answered with an error status
            (``urllib.error.HTTPError`` / ``URLError``).
    """
    body = encode_event(frame)
    headers = callback_headers(key, str(frame.get("run_id")), body) if key else None
    callback_connections.post(callback_url, body, POST_TIMEOUT if timeout is None else timeout, headers)


def post_events(callback_url: str, frames: list[dict[str, Any]], timeout: float | None = None, *,
                key: str | None = None) -> None:
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
    callback_connections.post(callback_url, body, POST_TIMEOUT if timeout is None else timeout, headers)


def _definitive(exc: OSError) -> bool:
    """A 4xx answer: the server understood and refused; posting again cannot help."""
    return isinstance(exc, urllib.error.HTTPError) and 400 <= exc.code < 500


async def _post(url: str, frame: dict[str, Any], key: str | None = None) -> None:
    await asyncio.get_running_loop().run_in_executor(None, functools.partial(post_event, url, frame, key=key))


async def _post_terminal(url: str, frame: dict[str, Any], key: str | None = None) -> bool:
    for attempt, delay in enumerate((*TERMINAL_POST_RETRIES, None)):
        try:
            await _post(url, frame, key)
            return True
        except OSError as exc:
            if isinstance(exc, urllib.error.HTTPError) and exc.code == 404:
                # Usually: the caller no longer waits for this run (it finished, was cancelled
                # or timed out). Not posted: an engine adapter may still deliver it its own way.
                logger.info("%s for run %s refused by %s (404, not retried): %s", frame.get("type"),
                            frame.get("run_id"), redact_callback_url(url), exc)
                return False
            if _definitive(exc) or delay is None:
                logger.error("could not post %s for run %s to %s after %d attempts: %r",
                             frame.get("type"), frame.get("run_id"), redact_callback_url(url), attempt + 1, exc)
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

    def __init__(self, url: str, key: str | None, run_id: str, started_delay: float) -> None:
        self.url, self.key, self.run_id = url, key, run_id
        self.loop = asyncio.get_running_loop()
        self.terminal: asyncio.Future[dict[str, Any]] = self.loop.create_future()
        self.started: list[asyncio.Future[None]] = []
        self._started_delay = started_delay
        self._started_timer: asyncio.TimerHandle | None = None
        self._beats_refused = False
        self._closed = False
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
            if not self._beats_refused:
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
        if not self._closed:
            self.started.append(asyncio.ensure_future(_post(self.url, event, self.key)))

    async def _post_heartbeat(self, event: dict[str, Any]) -> None:
        try:
            await _post(self.url, event, self.key)
        except OSError as exc:
            if _definitive(exc):
                if not self._beats_refused:
                    logger.info("heartbeats for run %s stop: %s refused them: %r", self.run_id,
                                redact_callback_url(self.url), exc)
                self._beats_refused = True
            else:
                logger.warning("heartbeat for run %s not delivered to %s: %r", self.run_id,
                               redact_callback_url(self.url), exc)

    async def _post_quietly(self, event: dict[str, Any]) -> None:
        try:
            await _post(self.url, event, self.key)
        except OSError as exc:
            logger.warning("%s event of run %s not delivered to %s: %r", event.get("type"), self.run_id,
                           redact_callback_url(self.url), exc)


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
    default: the engine's daemon threads). Setting ``cancel_event`` cancels the run (an
    async task stops; a sync one is abandoned) and posts ``task_cancelled``. ``posted`` is
    False when the terminal event could not be posted (a 4xx answer is not retried), so
    an engine adapter can deliver it another way.

    Raises:
        ValueError: the payload lacks ``callback_url``, ``run_id`` or ``task_id``.
    """
    if not isinstance(payload, dict):
        raise ValueError(f"A backend payload must be a dict, got {type(payload).__name__}.")
    missing = [key for key in ("callback_url", "run_id", "task_id") if not isinstance(payload.get(key), str)]
    if missing:
        raise ValueError(f"Backend payload lacks the string field(s) {missing}; it cannot be run or answered.")
    url, run_id, task_id = payload["callback_url"], payload["run_id"], payload["task_id"]
    key = payload.get("callback_key") if isinstance(payload.get("callback_key"), str) else None
    delivery = payload.get("delivery")
    interval = delivery.get("delivery_heartbeat_seconds") if isinstance(delivery, dict) else None
    delay = STARTED_DELAY
    if isinstance(interval, (int, float)) and not isinstance(interval, bool) and interval > 0:
        delay = min(delay, float(interval) / 6.0)
    sink = _CallbackSink(url, key, run_id, delay)
    # One run per engine: the engine that submitted the payload owns concurrency and
    # re-delivery, so nothing is cached here. The session decodes and dispatches the run
    # exactly as every worker service does (its one client, the payload, owns it).
    engine = WorkerEngine(max_concurrency=1, max_queued=0, idempotency_cache_size=0,
                          remember_run_ids=False, name="backend", threads=executor)
    session = WorkerService(engine, name="backend", exclusive=True).session(redact_callback_url(url), emit=sink)
    command: dict[str, Any] = {"type": "run_task", "run_id": run_id, "task_id": task_id}
    command.update((field, payload[field]) for field in ("task_name", "callable_pickle", "args_pickle", "delivery")
                   if field in payload)
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
        except OSError as exc:
            logger.warning("task_started for run %s not delivered to %s: %r", event.get("run_id"),
                           redact_callback_url(sink.url), exc)
    return await _post_terminal(sink.url, event, sink.key)


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


