"""``HttpEnvironmentExecutor``: sends command frames to a worker service over HTTP(S).

One ``POST`` per command (the Wove 2.x wire format). For a run with a heartbeat window
(``delivery_heartbeat_seconds``) the client asks for NDJSON (``Accept:
application/x-ndjson, application/json``) and hands each event to the runtime as its line
arrives, so ``task_started`` and heartbeats flow while the task runs; other runs ask for
one JSON body, which is cheaper for both sides (``executor_config.stream``: ``"auto"``,
true to always stream, false never). A plain JSON answer (one event, a list, or
``{"events": [...]}``) from a Wove 2.x worker works either way.

Binary frames (docs/wire.md): with a worker whose answers (or ``GET <url>/health``, asked
once before the first bulky run when nothing is known yet) carry ``X-Wove-Capabilities:
binary_frames``, and ``executor_config.binary_frames`` true (the default), a ``run_task``
with bulky data (:func:`wove.framing.worth_binary`) is POSTed as one binary frame with
``Content-Type: application/x-wove-frames``, and every request says ``Accept:
application/x-wove-frames, ...``; the worker then answers bulky events in binary frames (one
body, or as they happen for a streamed run, mixed with JSON lines), which the client splits
incrementally with :class:`wove.framing.FrameSplitter`. Large buffers are written from the caller's memory
(the body is a sequence of parts) unless the request is signed (the signature hashes the
joined body). A Wove 2.x worker announces nothing and gets today's JSON frames.

The client is, by default, :class:`wove_executor_http._native.NativePool`: HTTP/1.1
keep-alive connections on asyncio Protocols, with no httpx Request/Response objects, which
costs about half the CPU of httpx-aiohttp's ``AiohttpTransport`` per request at 256 in
flight (see the README). ``executor_config.transport`` selects ``"aiohttp"`` (httpx's
transport API over aiohttp's pool) or ``"httpx"`` (httpx's own pool; the one that speaks
HTTP/2). Both kinds of client answer the same small response shape (status, raw headers,
body), so one code path reads every answer.

Failures in transit become a ``task_error`` with ``source="transport"`` naming the URL,
the status and what was wrong: one table (:data:`FAILURES`, in the style of httpx's
``map_httpcore_exceptions``) maps the exception chain of a failed request to a label and
a hint (connection refused, TLS verification failed, timeout, connection lost, ...).

Re-delivery follows the policy every transport shares (:mod:`wove.transport`,
``docs/runtime.md``): a ``requeue`` run that was lost (reset mid-response, read timeout,
5xx, a response without a terminal event) is delivered again after a back-off, up to
``max_deliveries`` times, with or without an idempotency key (the worker deduplicates by
run id and idempotency key); while the worker cannot be reached (connection refused, DNS,
TLS handshake, connect timeout) the run waits for it up to ``reconnect_timeout`` seconds,
and those attempts are not deliveries. Runs with another orphan policy fail at once.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from wove.errors import ConfigError, exception_chain
from wove.framing import FrameSplitter, capability_names, worth_binary
from wove.options import (
    ANY,
    BOOL,
    DICT,
    PAYLOAD_OPTIONS,
    POSITIVE_INT,
    POSITIVE_SECONDS,
    REDELIVERY_OPTIONS,
    STR,
    Option,
    OptionSpec,
    one_of,
)
from wove.protocol import (
    BINARY_MAGIC,
    CAPABILITY_BINARY_FRAMES,
    CAPABILITY_TASK_YIELD,
    TERMINAL_EVENTS,
    SplitFrame,
    decode_events,
    encode_binary_parts,
    encode_frame,
)
from wove.registry import install_hint
from wove.security import (
    NetworkExecutorSecurity,
    canonical_http_target,
    ensure_secure_target,
    is_local_url,
)
from wove.tls import INSECURE_OPTION, TLS_OPTIONS, client_ssl_context, tls_settings
from wove.transport import FrameExecutor

__all__ = [
    "FAILURES", "FRAMES", "HTTP_OPTIONS", "HttpEnvironmentExecutor", "TransportFailure",
    "describe_failure",
]

logger = logging.getLogger(__name__)

INSTALL_HINT = f"Install it with: {install_hint('wove-executor-http')}"
ACCEPT = "application/x-ndjson, application/json"
#: The media type of binary frames back to back (request and response bodies).
FRAMES = "application/x-wove-frames"
# (reads binary frames, streamed) -> Accept
_ACCEPT = {
    (False, False): (b"Accept", b"application/json"),
    (False, True): (b"Accept", ACCEPT.encode()),
    (True, False): (b"Accept", f"{FRAMES}, application/json".encode()),
    (True, True): (b"Accept", f"{FRAMES}, {ACCEPT}".encode()),
}
_CONTENT_TYPE = {False: (b"Content-Type", b"application/json"), True: (b"Content-Type", FRAMES.encode())}
#: a binary body of at most this many bytes is joined (one write); larger ones are sent as
#: their parts, the large buffers straight from the caller's memory
_JOIN_BELOW = 256 * 1024
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_MAX_CONNECTIONS = 512
TRANSPORTS = ("native", "aiohttp", "httpx")

#: The http/https executor's ``executor_config`` keys (see :mod:`wove.options`; the TLS
#: keys are :data:`wove.tls.TLS_OPTIONS`, shared with grpc and websocket).
HTTP_OPTIONS = OptionSpec("http", [
    Option("url", STR, required=True, doc="http:// or https:// URL of the worker service, path included"),
    Option("security", ANY, doc="request signing: 'env:VAR', {'type': 'signed'|'bearer', ...} or 'none'"),
    Option("headers", DICT, doc="extra request headers (values are sent as str())"),
    Option("timeout", POSITIVE_SECONDS, doc="seconds the worker may stay silent on a request (default: none)"),
    Option("connect_timeout", POSITIVE_SECONDS,
           doc=f"seconds to connect (default: timeout, else {DEFAULT_CONNECT_TIMEOUT:g})"),
    INSECURE_OPTION,
    TLS_OPTIONS,
    Option("max_connections", POSITIVE_INT, DEFAULT_MAX_CONNECTIONS, "connections in the pool, at most"),
    Option("max_keepalive_connections", POSITIVE_INT, doc="idle connections kept (default: max_connections)"),
    Option("keepalive_expiry", POSITIVE_SECONDS, 30.0, "seconds an idle connection is kept"),
    Option("http2", BOOL, False, "speak HTTP/2 (needs transport='httpx' and the h2 package)"),
    Option("transport", one_of(*TRANSPORTS),
           doc="HTTP client: 'native' (default; HTTP/1.1 on asyncio), 'aiohttp' (httpx-aiohttp) or 'httpx' "
               "(default with http2)"),
    Option("stream", one_of("auto", True, False), "auto",
           "NDJSON events as they happen: 'auto' (runs with a heartbeat window), true, false"),
    REDELIVERY_OPTIONS,
    PAYLOAD_OPTIONS,
])
#: The same keys, named ``https`` in messages.
HTTPS_OPTIONS = HTTP_OPTIONS.extend("https", [])
_ERROR_PREVIEW = 300


class HttpEnvironmentExecutor(FrameExecutor):
    """Executor that POSTs command frames to a Wove worker service over HTTP or HTTPS.

    Args:
        require_https: refuse (at ``start()``) a URL that is not ``https://`` (the
            ``https`` executor name).
    """

    executor_name = "http"
    config_options = HTTP_OPTIONS

    def __init__(self, *, require_https: bool = False) -> None:
        super().__init__()
        self._require_https = require_https
        self.executor_name = "https" if require_https else "http"
        self._transport: Any = None  # the client: _native.NativePool or _HttpxClient
        self._url_object: Any = None
        self._httpx: Any = None
        self._health_target = b"/health"
        self._url = ""
        self._target = "/"
        self._headers: list[tuple[bytes, bytes]] = []
        self._security = NetworkExecutorSecurity()
        self._connect_timeout = DEFAULT_CONNECT_TIMEOUT
        self._read_timeout: float | None = None
        self._requests: dict[str, asyncio.Task[None]] = {}
        self._side: set[asyncio.Task[None]] = set()
        #: a response has told what the worker announces (``X-Wove-Capabilities``)
        self._announced = False
        #: the one ``GET <url>/health`` in flight (or done), shared by the runs that wait for it
        self._probe: asyncio.Task[None] | None = None
        self._binary_frames = True  # executor_config.binary_frames
        self._binary = False  # ... and the worker announced binary_frames

    def __repr__(self) -> str:
        return f"HttpEnvironmentExecutor(name={self.executor_name!r}, url={self._url!r})"

    # -- lifecycle -------------------------------------------------------------
    async def start(
        self,
        *,
        environment_name: str,
        environment_config: dict[str, Any],
        run_config: dict[str, Any],
    ) -> None:
        """Validate the config and open the connection pool (no connection is made yet).

        Raises:
            ConfigError: a config key is missing, unknown (with a did-you-mean) or
                invalid, or TLS keys contradict each other (the message names the key,
                the value and the fix); a non-local target without TLS or security.
            RuntimeError: a security environment variable is unset, or httpx is missing.
        """
        spec = HTTPS_OPTIONS if self._require_https else HTTP_OPTIONS
        config = spec.validate(environment_config, environment=environment_name)
        where = f"Environment '{environment_name}' ({self.executor_name} executor)"
        url = config["url"]
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ConfigError(f"{where}: executor_config.url must be an http:// or https:// URL, got {url!r}.")
        if self._require_https and parsed.scheme != "https":
            raise ConfigError(f"{where}: the https executor requires an https:// URL, got {url!r}; "
                              "use executor 'http' for plain HTTP on loopback.")
        tls = tls_settings(config, executor=self.executor_name, environment=environment_name,
                           url_tls=parsed.scheme == "https")
        security = NetworkExecutorSecurity.from_config(config["security"])
        ensure_secure_target(environment=environment_name, executor=self.executor_name, target=url,
                             local=is_local_url(url), tls=tls.enabled, security=security,
                             insecure=config["insecure"])
        security.resolve()
        headers = config["headers"] or {}
        timeout = config["timeout"]
        connect_timeout = float(config["connect_timeout"] or timeout or DEFAULT_CONNECT_TIMEOUT)
        max_connections = config["max_connections"]
        keepalive = config["max_keepalive_connections"] or max_connections
        expiry = float(config["keepalive_expiry"])
        http2 = config["http2"]
        transport_name = config["transport"] or ("httpx" if http2 else "native")
        if http2 and transport_name != "httpx":
            raise ConfigError(f"{where}: http2=true needs transport='httpx' ({transport_name} speaks HTTP/1.1 only).")

        try:
            import httpx
        except ImportError as exc:  # pragma: no cover - a dependency
            raise RuntimeError(f"{self.executor_name} executor needs httpx, which is not installed. {INSTALL_HINT}") from exc
        self._httpx = httpx
        self._open_events(environment_name, environment_config)
        context = client_ssl_context(tls) if tls.enabled else None
        url_object = httpx.URL(url)
        transport: Any
        if transport_name == "native":
            from ._native import NativePool

            transport = NativePool(url_object.host, url_object.port or (443 if parsed.scheme == "https" else 80),
                                   ssl_context=context, server_hostname=tls.server_hostname,
                                   max_connections=max_connections, max_keepalive=keepalive,
                                   keepalive_expiry=expiry, connect_timeout=connect_timeout)
        else:
            ssl_verify: Any = context if context is not None else True
            limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=keepalive,
                                  keepalive_expiry=expiry)
            pool: httpx.AsyncBaseTransport
            if transport_name == "aiohttp":
                try:
                    from httpx_aiohttp import AiohttpTransport
                except ImportError as exc:  # pragma: no cover - a dependency
                    raise RuntimeError(f"{self.executor_name} executor transport 'aiohttp' needs httpx-aiohttp, which "
                                       f"is not installed. {INSTALL_HINT}, or set executor_config.transport='native'."
                                       ) from exc
                pool = AiohttpTransport(verify=ssl_verify, limits=limits, trust_env=False)
            else:
                try:
                    pool = httpx.AsyncHTTPTransport(verify=ssl_verify, limits=limits, http2=http2, trust_env=False)
                except ImportError as exc:
                    raise RuntimeError(f"{where}: http2=true needs the h2 package: pip install 'httpx[http2]'."
                                       ) from exc
            extensions: dict[str, Any] = {
                "timeout": {"connect": connect_timeout, "read": timeout, "write": timeout, "pool": None}}
            if tls.server_hostname:
                extensions["sni_hostname"] = tls.server_hostname  # both transports honour it
            transport = _HttpxClient(httpx, pool, url_object, extensions)
        self._transport = transport
        self._url_object = url_object
        self._connect_timeout, self._read_timeout = connect_timeout, timeout
        self._url = url
        self._target = canonical_http_target(url)
        self._target_bytes = url_object.raw_path  # percent-encoded, as httpx sends it
        self._health_target = url_object.copy_with(path=url_object.path.rstrip("/") + "/health", query=None).raw_path
        self._security = security
        self._stream = config["stream"]
        self._binary_frames = bool(config["binary_frames"])
        self._binary = False
        self._announced = False
        self._probe = None
        self.capabilities = frozenset()
        self._headers = [(b"Host", self._url_object.netloc),
                         *((str(k).encode("latin-1"), str(v).encode("latin-1")) for k, v in headers.items())]
        logger.debug("%s executor for environment %s: %s via %s", self.executor_name, environment_name, url, transport_name)

    async def stop(self) -> None:
        """Abort outstanding requests and close the connection pool."""
        tasks = [*self._requests.values(), *self._side]
        if self._probe is not None and not self._probe.done():
            tasks.append(self._probe)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._requests.clear()
        self._side.clear()
        if self._transport is not None:
            transport, self._transport = self._transport, None
            await transport.aclose()
        self._events = None

    # -- commands --------------------------------------------------------------
    async def send(self, frame: dict[str, Any]) -> None:
        """Send one command; returns once the request is under way.

        Raises:
            RuntimeError: the executor is not started.
            ValueError: an unknown frame type.
            DispatchError: the callable or an argument cannot be pickled.
        """
        if self._transport is None:
            raise RuntimeError(f"{self.executor_name} executor for environment '{self._environment}' is not started.")
        frame_type = frame.get("type")
        if frame_type == "run_task":
            # bulky: a binary frame once the worker said it reads them; small: JSON, which
            # costs less (wove.framing.worth_binary)
            body = _Body.of(frame, binary=worth_binary(frame) and await self._use_binary())
            self._check_payload(frame, body.size)
            self._track(frame, body.size)
            run_id = frame["run_id"]
            self._requests[run_id] = asyncio.ensure_future(self._deliver(frame, body))
        elif frame_type == "cancel_task" or frame_type == "stream_credit":  # credit: only once task_yield was announced
            task = asyncio.ensure_future(self._cancel(frame, _Body.of(frame, binary=False)))
            self._side.add(task)
            task.add_done_callback(self._side.discard)
        elif frame_type == "shutdown":
            # A worker service is shared: the runtime already sent cancel_task for each
            # pending run, so the service is not told to shut down; open requests end here.
            await self._drain_cancels()
            for task in list(self._requests.values()):
                task.cancel()
        else:
            raise ValueError(f"Unsupported frame type {frame_type!r}; expected run_task, cancel_task or shutdown.")

    async def _drain_cancels(self) -> None:
        if self._side:
            await asyncio.wait(list(self._side), timeout=2.0)

    async def _request(self, body: _Body, *, stream: bool = False) -> _Response:
        """POST one command: prebuilt target and headers, signed over ``body``; returns
        once the response head arrived.

        ``stream`` asks for the NDJSON extension (events as they happen); otherwise the
        answer is one JSON body, which costs both sides less per request. With a worker
        that reads binary frames, it says it reads them too (the worker then answers a
        bulky result in binary frames, one body or as they happen).
        """
        headers = [*self._headers, _CONTENT_TYPE[body.binary], _ACCEPT[body.binary or self._binary, stream],
                   (b"Content-Length", str(body.size).encode())]
        parts: list[bytes | memoryview]
        if self._security.mode == "signed":  # the signature hashes the body: it is one buffer
            content = body.joined()
            parts = [content]
            signed = self._security.headers_for(transport="http", target=self._target, body=content)
            headers.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in signed.items())
        else:
            if self._security.mode != "none":  # bearer: the body is not part of it
                signed = self._security.headers_for(transport="http", target=self._target, body=b"")
                headers.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in signed.items())
            parts = body.parts
        response: _Response = await self._transport.request(b"POST", self._target_bytes, headers, parts,
                                                             timeout=self._read_timeout)
        return response

    def _learn(self, response: Any) -> None:
        """Read the worker's ``X-Wove-Capabilities`` from a response (absent: a Wove 2.x worker).
        Streamed runs need NDJSON answers, so ``executor_config.stream = false`` announces no
        ``task_yield``; ``binary_frames = false`` announces no ``binary_frames`` (JSON only)."""
        header = next((value for name, value in response.headers if name.lower() == b"x-wove-capabilities"), b"")
        self._announced = True
        announced = capability_names(header)
        if self._stream is False:
            announced -= {CAPABILITY_TASK_YIELD}
        if not self._binary_frames:
            announced -= {CAPABILITY_BINARY_FRAMES}
        self.capabilities = announced
        self._binary = CAPABILITY_BINARY_FRAMES in announced

    async def _use_binary(self) -> bool:
        """Whether a run_task goes as a binary frame: ``binary_frames`` is on and the worker
        announced it. Before any answer told, the first run asks ``GET <url>/health`` once
        (concurrent runs wait for the same probe); when that fails, runs go as JSON until an
        answer tells."""
        if not self._binary_frames:
            return False
        if not self._announced and (self._probe is None or not self._probe.done()):
            await self.negotiate_capabilities()
        return self._binary

    async def negotiate_capabilities(self) -> frozenset[str]:
        """What the worker announces: learnt from its answers, or, before the first one,
        from ``GET <url>/health`` (every answer of a Wove 3 worker carries ``X-Wove-Capabilities``).
        Concurrent callers share one probe; a probe that failed is tried again by the next call."""
        if self._announced or self._transport is None:
            return self.capabilities
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self._ask_health())
        # shielded: a caller that is cancelled does not cancel the probe the others wait for
        await asyncio.shield(self._probe)
        return self.capabilities

    async def _ask_health(self) -> None:
        """``GET <url>/health``; its answer is immediate, so it may take connect_timeout
        to arrive at most (runs wait for it: a silent worker must not hold them)."""
        bound = self._connect_timeout
        read = bound if self._read_timeout is None else min(bound, self._read_timeout)
        try:
            response = await self._transport.request(b"GET", self._health_target, self._headers[:1], [],
                                                     timeout=read)
            try:
                await response.aread()
            finally:
                await response.aclose()
            self._learn(response)
        except Exception as exc:  # unreachable: the run_task fails the usual way, or says so
            logger.debug("%s: capability probe failed: %r", self._url, exc)

    async def _cancel(self, frame: dict[str, Any], body: _Body) -> None:
        try:
            response = await self._request(body)
            self._learn(response)
            try:
                text = await response.aread()
            finally:
                await response.aclose()
            if response.status != 200:
                logger.warning("%s: cancel_task for run %s answered HTTP %d: %s", self._url, frame.get("run_id"),
                               response.status, text[:_ERROR_PREVIEW].decode("utf-8", "replace"))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.warning("%s: cancel_task for run %s could not be sent: %r", self._url, frame.get("run_id"), exc)

    async def _deliver(self, frame: dict[str, Any], body: _Body) -> None:
        run_id = frame["run_id"]
        loop = asyncio.get_running_loop()
        outage: float | None = None  # loop time the worker became unreachable
        unreachable = 0  # consecutive attempts that could not reach it
        try:
            while True:
                outcome = await self._post_run(frame, body)
                if outcome is None:
                    return
                if not outcome.reached:
                    outage = loop.time() if outage is None else outage
                    unreachable += 1
                    wait = self._unreachable(run_id, outcome.reason, outcome.exc, since=outage, attempt=unreachable,
                                             kind=outcome.kind)
                    if wait is None:
                        return
                else:
                    outage, unreachable = None, 0
                    if not self._lost(run_id, outcome.reason, outcome.exc, redeliverable=outcome.redeliverable,
                                      kind=outcome.kind):
                        return
                    wait = self._redelivery_delay(run_id)
                await asyncio.sleep(wait)
                self._track(frame)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not leave the run hanging
            logger.exception("%s: unexpected failure delivering run %s", self._url, run_id)
            self._lost(run_id, f"Unexpected failure sending run {run_id} to {self._url}: {exc!r}", exc,
                       redeliverable=False)
        finally:
            if self._requests.get(run_id) is asyncio.current_task():
                del self._requests[run_id]

    async def _post_run(self, frame: dict[str, Any], body: _Body) -> _Outcome | None:
        """POST one run_task and emit its events. Returns None when a terminal event came,
        else what went wrong."""
        httpx = self._httpx
        run_id = frame["run_id"]
        where = f"HTTP worker service at {self._url}"
        status: int | None = None
        terminal = False
        try:
            # The transport is called directly: AsyncClient's per-request machinery (header
            # merging, URL parsing, auth/redirect/cookie handling) cost more CPU than the
            # request itself at high concurrency (README, "Performance").
            delivery = frame.get("delivery") or {}
            stream = self._stream if self._stream != "auto" else bool(
                delivery.get("delivery_heartbeat_seconds") or delivery.get("delivery_stream_window"))
            response = await self._request(body, stream=stream)
            self._learn(response)
            try:
                status = response.status
                if status != 200:
                    text = (await response.aread())[:_ERROR_PREVIEW].decode("utf-8", "replace")
                    return _refused(where, status, run_id, text.strip())
                content_type = next((value for name, value in response.headers
                                     if name.lower() == b"content-type"), b"")
                if b"ndjson" in content_type or b"x-wove-frames" in content_type:
                    # NDJSON lines and binary frames, in any mix, each delivered as it completes
                    messages: list[bytes | bytearray | SplitFrame] = []
                    problems: list[str] = []
                    splitter = FrameSplitter(messages.append, problems.append, by_segment=True)
                    async for chunk in response.chunks():
                        splitter.feed(chunk)
                        if problems:
                            raise _WrongAnswer(problems[0])
                        for message in messages:
                            if isinstance(message, SplitFrame) or message.strip():
                                terminal = self._deliver_events(message, frame) or terminal
                        messages.clear()
                    splitter.close()
                    if problems:
                        raise _WrongAnswer(problems[0])
                    for message in messages:
                        if isinstance(message, SplitFrame) or message.strip():
                            terminal = self._deliver_events(message, frame) or terminal
                else:
                    data = await response.aread()
                    if data.strip():
                        terminal = self._deliver_events(data, frame)
            finally:
                await response.aclose()
        except _WrongAnswer as exc:
            return _Outcome(f"{where} sent an invalid answer for run {run_id} (HTTP {status}): {exc}", exc.__cause__,
                            redeliverable=False)
        except (httpx.HTTPError, OSError) as exc:
            if status is not None and status != 200:
                # the worker answered (413 for a large body, ...) and closed the connection
                # while the body was still being sent: the reset may cut its message off
                return _refused(where, status, run_id, f"(its message was cut off: {type(exc).__name__})")
            failure = describe_failure(exc, self._url, connect_timeout=self._connect_timeout,
                                       timeout=self._read_timeout)
            status_text = f" (after HTTP {status})" if status is not None else ""
            return _Outcome(f"{failure.message}{status_text} [run {run_id}]", exc, kind=failure.kind,
                            reached=failure.reached or status is not None)
        if terminal:
            return None
        # a clean end of the response without a terminal event: the worker dropped the run
        # (it shut down with orphan policy requeue), so delivering it again is safe.
        return _Outcome(f"{where} ended the response (HTTP {status}) without a terminal event for run {run_id}; "
                        "the worker may have shut down.", None)

    def _deliver_events(self, data: bytes | bytearray | memoryview | SplitFrame, frame: dict[str, Any]) -> bool:
        """Decode one message (a JSON body or line, or binary frames) and emit its events;
        True when one was terminal."""
        run_id = frame["run_id"]
        try:
            events = decode_events(data)
        except Exception as exc:
            preview = data.head if isinstance(data, SplitFrame) else data
            raise _WrongAnswer(f"{exc}; received {bytes(preview[:120])!r}") from exc
        self._warn_received(events, len(data))
        terminal = False
        for event in events:
            if event.get("type") != "log" and event.get("run_id") != run_id:
                raise _WrongAnswer(f"event {event.get('type')} names run {event.get('run_id')!r}, expected {run_id!r}")
            if event.get("type") in TERMINAL_EVENTS:
                terminal = True
            self._emit(event)
        return terminal


_STATUS_HINTS = {
    401: " Configure executor_config.security to match the worker's --security.",
    403: " Check that executor_config.security uses the worker's secret and that clocks agree.",
    408: " The worker timed out reading the request (its --body-timeout).",
    413: " The request was too large for the worker: start it with a larger --max-body-bytes or send smaller "
         "arguments.",
    404: " Check the URL path (the worker's --path, default /wove).",
}


def _refused(where: str, status: int, run_id: str, text: str) -> _Outcome:
    """A run the worker answered with an error status."""
    # the worker may answer later (overloaded, restarting); a 4xx will not change
    retry = status >= 500 or status in (408, 429)
    return _Outcome(f"{where} answered HTTP {status} for run {run_id}: {text}.{_STATUS_HINTS.get(status, '')}",
                    None, redeliverable=retry, kind=f"HTTP{status}")


class _WrongAnswer(Exception):
    """The worker's answer is not a valid event stream for the run."""


class _Body:
    """An encoded command: one buffer (JSON, or a small binary frame), or a binary frame's
    parts (its large buffers are views of the caller's data, written without joining)."""

    __slots__ = ("binary", "parts", "size")

    def __init__(self, parts: list[bytes | memoryview], size: int, binary: bool) -> None:
        self.parts = parts
        self.size = size
        self.binary = binary

    @classmethod
    def of(cls, frame: dict[str, Any], *, binary: bool) -> _Body:
        """Encode ``frame`` (raises DispatchError as the encoders do)."""
        if not binary:
            data = encode_frame(frame)
            return cls([data], len(data), False)
        parts = encode_binary_parts(frame)
        size = sum(len(part) for part in parts)
        if size <= _JOIN_BELOW:
            return cls([b"".join(parts)], size, True)
        return cls(parts, size, True)

    def joined(self) -> bytes:
        """The body as one buffer (joined once and kept: a re-delivery sends it again)."""
        if len(self.parts) != 1 or not isinstance(self.parts[0], bytes):
            self.parts = [b"".join(self.parts)]
        data = self.parts[0]
        assert isinstance(data, bytes)
        return data

    def content(self) -> Any:
        """httpx request content: the bytes, or an async iterator over the parts (the
        request has an explicit Content-Length, so the body is not chunked)."""
        if len(self.parts) == 1:
            return self.parts[0]
        return _iterate(self.parts)


async def _iterate(parts: list[bytes | memoryview]) -> AsyncIterator[bytes | memoryview]:
    for part in parts:
        yield part


class _Response(Protocol):
    """What both clients answer: status, raw headers, the body (as it arrives, or whole)."""

    status: int
    headers: list[tuple[bytes, bytes]]

    def chunks(self) -> AsyncIterator[bytes]: ...

    async def aread(self) -> bytes: ...

    async def aclose(self) -> None: ...


class _HttpxClient:
    """An httpx transport (httpx's own pool or httpx-aiohttp's) behind the native client's
    ``request`` (the transport API directly: AsyncClient's per-request machinery costs more
    CPU than the request itself at high concurrency)."""

    def __init__(self, httpx: Any, transport: Any, url: Any, extensions: dict[str, Any]) -> None:
        self._httpx = httpx
        self._transport = transport
        self._url = url
        self._urls: dict[bytes, Any] = {url.raw_path: url}
        self._extensions = extensions

    async def request(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]],
                      parts: list[bytes | memoryview], *, timeout: float | None) -> _HttpxResponse:
        url = self._urls.get(target)
        if url is None:
            url = self._urls[target] = self._url.copy_with(raw_path=target)
        extensions = self._extensions
        if timeout != extensions["timeout"]["read"]:
            extensions = {**extensions, "timeout": {**extensions["timeout"], "read": timeout, "write": timeout}}
        content: Any = None if not parts else parts[0] if len(parts) == 1 else _iterate(parts)
        request = self._httpx.Request(method.decode("ascii"), url, headers=headers, content=content,
                                      extensions=extensions)
        return _HttpxResponse(await self._transport.handle_async_request(request))

    async def aclose(self) -> None:
        await self._transport.aclose()


class _HttpxResponse:
    __slots__ = ("_response", "headers", "status")

    def __init__(self, response: Any) -> None:
        self._response = response
        self.status: int = response.status_code
        # raw headers and the raw byte stream: the worker sends no content-encoding, and
        # httpx's decoded views cost more than the rest of a no-op request
        self.headers: list[tuple[bytes, bytes]] = response.headers.raw

    async def chunks(self) -> AsyncIterator[bytes]:
        async for chunk in self._response.stream:
            yield chunk

    async def aread(self) -> bytes:
        chunks = [chunk async for chunk in self._response.stream]
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def aclose(self) -> None:
        await self._response.aclose()


_NUL = BINARY_MAGIC[0]
_BLANK = frozenset(b" \t\r\n")


@dataclass(frozen=True)
class _Outcome:
    """Why a delivery ended without a terminal event."""

    reason: str
    exc: BaseException | None
    redeliverable: bool = True
    kind: str | None = None
    reached: bool = True  # False: the request certainly never reached a worker


@dataclass(frozen=True)
class TransportFailure:
    """A failed request, described: see :func:`describe_failure`.

    Attributes:
        kind: short name (the ``kind`` of the ``task_error``), e.g. ``ConnectionRefused``.
        message: what happened, naming the URL, the cause and the fix.
        reached: False when the request certainly never reached the worker (nothing ran).
    """

    kind: str
    message: str
    reached: bool


#: The one table of request failures, most specific first: (exception types, kind,
#: label, hint, reached). A failure is described by the first row whose types match any
#: exception in its chain (``__cause__``, ``__context__``, aiohttp's ``os_error``); labels
#: and hints are formatted with ``url``, ``port``, ``connect_timeout`` and ``timeout``.
#: Rows for aiohttp and httpx types are added when an executor first describes a failure
#: (they are imported lazily).
FAILURES: list[tuple[tuple[type[BaseException], ...], str, str, str, bool]] = [
    ((ssl.SSLCertVerificationError,), "TLSVerifyFailed",
     "TLS certificate verify failed for {url}",
     "The worker's certificate is not trusted here: set executor_config.ca_file to the CA bundle (PEM) that "
     "signed it (and executor_config.server_hostname when the certificate names another host); "
     "executor_config.cert_file and key_file send a client certificate when the worker asks for one; "
     "executor_config.verify=false only for development.", False),
    ((ssl.SSLError,), "TLSError",
     "TLS handshake with {url} failed",
     "Check that the worker serves HTTPS (wove worker http --certfile/--keyfile) on that port, and the TLS "
     "settings executor_config.ca_file, cert_file, key_file and verify.", False),
    ((ConnectionRefusedError,), "ConnectionRefused",
     "connection refused at {url}",
     "Is the worker service running? Start it with `wove worker http --port {port}`, or fix executor_config.url.",
     False),
    ((socket.gaierror,), "HostNotFound",
     "could not resolve the host of {url}",
     "Check the host name in executor_config.url.", False),
]
_LOST_HINT = ("The worker may have crashed or restarted; use delivery_orphan_policy='requeue' to deliver such "
              "runs again automatically.")
_CONNECT_TIMEOUT = ("ConnectTimeout", "timeout: no connection to {url} within connect_timeout={connect_timeout:g}s",
                    "Is the worker reachable from here (host, port, firewall)? Raise executor_config.connect_timeout "
                    "on a slow network.", False)
_READ_TIMEOUT = ("Timeout", "timeout: {url} sent nothing for {timeout}s (executor_config.timeout)",
                 "Raise executor_config.timeout, or bound runs with delivery_timeout instead.", True)
_table_ready = False


def _complete_table() -> None:
    """Add the aiohttp and httpx rows to :data:`FAILURES` (once)."""
    global _table_ready
    if _table_ready:
        return
    import aiohttp
    import httpx

    connect_timeouts: tuple[type[BaseException], ...] = (httpx.ConnectTimeout, httpx.PoolTimeout)
    if hasattr(aiohttp, "ConnectionTimeoutError"):
        connect_timeouts += (aiohttp.ConnectionTimeoutError,)
    FAILURES.extend([
        (connect_timeouts, *_CONNECT_TIMEOUT),
        ((aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, httpx.RemoteProtocolError, httpx.ReadError,
          httpx.WriteError, ConnectionResetError, ConnectionAbortedError, BrokenPipeError), "ConnectionLost",
         "the connection to {url} was lost before the run finished", _LOST_HINT, True),
        ((httpx.TimeoutException, TimeoutError, asyncio.TimeoutError), *_READ_TIMEOUT),
        ((aiohttp.ClientConnectorError, httpx.ConnectError), "ConnectError",
         "could not connect to {url}",
         "Is the worker service running and reachable? Check executor_config.url.", False),
    ])
    _table_ready = True


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes, outermost first. httpx-aiohttp maps every aiohttp
    connection error to ``httpx.ConnectTimeout``, so an httpx exception raised from an
    aiohttp one is left out: aiohttp's own exception says what happened."""
    return [item for item in exception_chain(exc, attributes=("os_error", "certificate_error"))
            if not (type(item).__module__.startswith("httpx") and item.__cause__ is not None
                    and type(item.__cause__).__module__.startswith("aiohttp"))]


def describe_failure(exc: BaseException, url: str, *, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                     timeout: float | None = None) -> TransportFailure:
    """Describe a failed request to ``url`` with the :data:`FAILURES` table.

    The message reads ``<label>: <cause>. <hint>``, for example ``connection refused at
    http://127.0.0.1:8000/wove: [Errno 111] ... Is the worker service running? ...``.
    """
    _complete_table()
    chain = _chain(exc)
    port = urllib.parse.urlsplit(url).port or ""
    for types, kind, label, hint, reached in FAILURES:
        matches = [item for item in chain if isinstance(item, types)]
        if not matches:
            continue
        match = matches[-1]  # the deepest: the most specific detail
        values = {"url": url, "port": port, "connect_timeout": connect_timeout,
                  "timeout": "none" if timeout is None else f"{timeout:g}"}
        detail = getattr(match, "verify_message", None) or str(match) or type(match).__name__
        return TransportFailure(kind, f"{label.format(**values)}: {detail}. {hint.format(**values)}",
                                reached and not _never_reached(exc))
    root = chain[-1] if chain else exc
    return TransportFailure(type(root).__name__, f"the request to {url} failed: {type(root).__name__}: {root}.",
                            _never_reached(exc))


def _never_reached(exc: BaseException) -> bool:
    """True when the request certainly did not reach the worker (safe to send again)."""
    import httpx

    cause = exc.__cause__
    if cause is not None and type(cause).__module__.startswith("aiohttp"):
        import aiohttp

        return isinstance(cause, aiohttp.ClientConnectorError)
    return isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout))
