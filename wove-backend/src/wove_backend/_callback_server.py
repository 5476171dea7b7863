"""The HTTP server that receives backend workers' callbacks (uvicorn + a raw ASGI app)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import importlib.util
import logging
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, unquote

from wove.errors import ProtocolError
from wove.protocol import decode_events, parse_json

logger = logging.getLogger("wove.backend")

#: Largest callback body the server accepts (results travel in callbacks).
DEFAULT_MAX_BODY_BYTES = 256 * 1024 * 1024
EVENTS_PATH = "/wove/events/"
#: Header naming the run a signed callback is for (percent-encoded run id).
CALLBACK_RUN_HEADER = "X-Wove-Run-Id"
#: Header carrying ``v1=<hex HMAC-SHA256>`` of a callback, keyed by the run's ``callback_key``.
CALLBACK_SIGNATURE_HEADER = "X-Wove-Callback-Signature"


def new_callback_key() -> str:
    """A fresh per-run callback key (64 hex characters), carried in the run's payload."""
    return secrets.token_hex(32)


def sign_callback(key: str, run_id: str, body: bytes) -> str:
    """The ``X-Wove-Callback-Signature`` value of ``body`` posted for ``run_id``.

    ``v1=`` + hex HMAC-SHA256(key, ``"wove-callback-v1\n" + run_id + "\n" + body``): the
    signature binds the body to one run, so a worker holding one run's payload cannot
    post events for another run.
    """
    mac = hmac.new(key.encode("utf-8"), b"wove-callback-v1\n", hashlib.sha256)
    mac.update(run_id.encode("utf-8"))
    mac.update(b"\n")
    mac.update(body)
    return "v1=" + mac.hexdigest()


def callback_headers(key: str, run_id: str, body: bytes) -> dict[str, str]:
    """The headers that sign a callback ``body`` for ``run_id`` (see :func:`sign_callback`)."""
    return {CALLBACK_RUN_HEADER: quote(run_id, safe=""), CALLBACK_SIGNATURE_HEADER: sign_callback(key, run_id, body)}


def _raw_events(obj: Any) -> list[Any]:
    """The event objects of a parsed body, as :func:`wove.protocol.decode_events` reads them."""
    if isinstance(obj, dict) and "events" in obj and "type" not in obj:
        events = obj["events"]
        return events if isinstance(events, list) else []
    return obj if isinstance(obj, list) else [obj]


def redact_callback_url(url: str) -> str:
    """The callback URL without its token (tokens never go into logs or errors)."""
    if EVENTS_PATH in url:
        return url.split(EVENTS_PATH, 1)[0] + EVENTS_PATH + "<token>"
    return url


def _server_class() -> Any:
    import contextlib

    import uvicorn

    class Server(uvicorn.Server):  # type: ignore[misc]
        @contextlib.contextmanager
        def capture_signals(self) -> Any:
            # The callback server lives inside the user's program: Ctrl-C belongs to it.
            yield

    return Server


class BackendCallbackServer:
    """Receives worker callbacks over HTTP (uvicorn + a small ASGI app) on the running loop.

    Workers POST events to :attr:`callback_url` (``/wove/events/<token>``). Any other path,
    a wrong token, another method or an oversized body gets 404/403/405/413 and nothing
    is queued; a body that does not decode gets 400.

    With ``is_pending`` (as :class:`BackendAdapterEnvironmentExecutor` runs it), the body
    is parsed as JSON and every run it names is checked *before any pickled field is
    decoded*: a callback naming a run that is not pending gets 404 and nothing of it is
    unpickled. With ``run_key``, a callback carrying ``X-Wove-Run-Id`` and
    ``X-Wove-Callback-Signature`` (what Wove 3 workers send) is verified against that
    run's key on the raw bytes first (403 when it does not match, or when an event in it
    names another run); an unsigned callback (a Wove 2.x worker) is accepted for a pending
    run unless ``require_signature`` is set (then 403).

    Args:
        host: interface to bind (``127.0.0.1`` by default).
        port: port to bind; 0 picks a free one.
        public_url: the URL workers use when they reach this server through another
            address (a proxy or NAT): its base, or the full ``.../wove/events/<token>`` URL.
        token: the secret path segment; default: 32 random bytes, URL-safe.
        max_body_bytes: largest accepted body.
        on_events: called with each decoded list of events; without it events wait in a
            queue for :meth:`recv`.
        is_pending: True for a run id whose events are expected; without it every run is.
        run_key: the callback key of a pending run (verifies signed callbacks).
        require_signature: refuse unsigned callbacks (no Wove 2.x workers).
        ssl_certfile: serve HTTPS with this certificate (PEM path) ...
        ssl_keyfile: ... and this key (default: in ``ssl_certfile``).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        public_url: str | None = None,
        token: str | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        on_events: Callable[[list[dict[str, Any]]], None] | None = None,
        is_pending: Callable[[str], bool] | None = None,
        run_key: Callable[[str], str | None] | None = None,
        require_signature: bool = False,
        ssl_certfile: str | None = None,
        ssl_keyfile: str | None = None,
    ) -> None:
        if token is not None and (not isinstance(token, str) or len(token) < 16 or "/" in token):
            raise ValueError("callback_token must be a string of at least 16 characters without '/'; "
                             "leave it unset to get a random one.")
        self.host = host
        self.port = port
        self.public_url = public_url
        self.token = token or secrets.token_urlsafe(32)
        self.max_body_bytes = max_body_bytes
        self._on_events = on_events
        self._is_pending = is_pending
        self._run_key = run_key
        self.require_signature = require_signature
        self.ssl_certfile, self.ssl_keyfile = ssl_certfile, ssl_keyfile
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._server: Any = None
        self._task: asyncio.Task[None] | None = None
        self.bound_port: int | None = None

    @property
    def callback_url(self) -> str | None:
        """The URL workers post to (None until started)."""
        if self.bound_port is None:
            return None
        if self.public_url:
            base = self.public_url.rstrip("/")
            return base if base.endswith(EVENTS_PATH + self.token) else base + EVENTS_PATH + self.token
        host = f"[{self.host}]" if ":" in self.host else self.host
        if host in ("0.0.0.0", "[::]"):
            host = socket.gethostname()
        scheme = "https" if self.ssl_certfile else "http"
        return f"{scheme}://{host}:{self.bound_port}{EVENTS_PATH}{self.token}"

    async def start(self) -> None:
        """Bind and serve on the running loop; returns when the server accepts connections.

        Raises:
            OSError: the address cannot be bound (names host and port).
            RuntimeError: uvicorn is missing (with the install command) or did not start.
        """
        if self._task is not None:
            return
        try:
            import uvicorn
        except ImportError as exc:
            raise RuntimeError("The backend callback server needs uvicorn, which is not installed. "
                               'Install it with: pip install "wove-core[backend]"') from exc
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"Backend callback server cannot bind {self.host}:{self.port}: {exc.strerror}. "
                          "Set executor_config.callback_host/callback_port to a free address.") from exc
        sock.setblocking(False)
        # httptools (uvicorn[standard]) parses several times faster than h11; workers keep
        # their connections alive (wove.backend.CallbackConnectionPool), so no per-request setup.
        http = "httptools" if importlib.util.find_spec("httptools") is not None else "h11"
        config = uvicorn.Config(self._app, interface="asgi3", lifespan="off", log_level="warning", access_log=False,
                                proxy_headers=False, http=http, ws="none",
                                timeout_keep_alive=30, server_header=False, date_header=False,
                                ssl_certfile=self.ssl_certfile, ssl_keyfile=self.ssl_keyfile)
        self._server = _server_class()(config)
        self._task = asyncio.ensure_future(self._server.serve(sockets=[sock]))
        deadline = time.monotonic() + 10.0
        while not self._server.started:
            if self._task.done() or time.monotonic() > deadline:
                error = None if not self._task.done() or self._task.cancelled() else self._task.exception()
                sock.close()
                await self.stop()
                raise RuntimeError(f"Backend callback server on {self.host}:{self.port} did not start: {error!r}")
            await asyncio.sleep(0.005)
        self.bound_port = int(sock.getsockname()[1])
        logger.debug("backend callback server listening on %s", redact_callback_url(self.callback_url or ""))

    async def stop(self) -> None:
        """Stop serving (bounded: open connections get a second to finish)."""
        if self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), 2.0)
        except (asyncio.TimeoutError, Exception):
            self._server.force_exit = True
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._task = None
        self._server = None
        self.bound_port = None

    async def recv(self) -> dict[str, Any]:
        """The next event (only when no ``on_events`` callback was given)."""
        return await self._queue.get()

    async def _app(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            return
        status, message = await self._handle(scope, receive)
        body = message.encode("utf-8")
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def _handle(self, scope: dict[str, Any], receive: Callable[..., Any]) -> tuple[int, str]:
        path: str = scope.get("path", "")
        if not path.startswith(EVENTS_PATH):
            return 404, "Not found."
        if not hmac.compare_digest(path[len(EVENTS_PATH):].encode(), self.token.encode()):
            return 403, "Unknown callback token."
        if scope.get("method") != "POST":
            return 405, "Callbacks are POST requests."
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    return 400, "Invalid Content-Length."
                if declared > self.max_body_bytes:
                    return 413, f"Body of {declared} bytes exceeds the limit of {self.max_body_bytes} bytes."
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return 400, "Client disconnected."
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return 413, f"Body exceeds the limit of {self.max_body_bytes} bytes."
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        status, message = self._verify_signature(scope, body)
        if status:
            return status, message
        signed_run = message or None
        # Parse JSON only (no pickle) and check every run the body names before decoding.
        try:
            obj = parse_json(body)
        except ProtocolError as exc:
            logger.warning("backend callback rejected: %s", exc)
            return 400, f"Invalid callback: {exc}"
        run_ids: list[str] = []
        for index, raw in enumerate(_raw_events(obj)):
            if not isinstance(raw, dict):
                return 400, f"Invalid callback: event {index} must be a JSON object, got {type(raw).__name__}."
            run_id = raw.get("run_id")
            if isinstance(run_id, str):
                run_ids.append(run_id)
            elif raw.get("type") != "log":
                return 400, f"Invalid callback: {raw.get('type')!r:.60} event {index} needs a string 'run_id', got {run_id!r:.80}."
        if self._is_pending is not None:
            unknown = sorted({run_id for run_id in run_ids if not self._is_pending(run_id)})
            if unknown:
                shown = ", ".join(repr(run_id[:120]) for run_id in unknown[:3]) + (" ..." if len(unknown) > 3 else "")
                logger.warning("backend callback refused (404): no pending run %s; nothing in it was decoded", shown)
                return 404, (f"Unknown run {shown}: no run with that id is pending here (it finished, was "
                             "cancelled, or was never submitted); nothing in this callback was decoded.")
        if signed_run is not None:
            others = sorted({run_id for run_id in run_ids if run_id != signed_run})
            if others:
                logger.warning("backend callback refused (403): signed for run %r but names %r", signed_run[:120],
                               others[0][:120])
                return 403, (f"Callback signed for run {signed_run[:120]!r} carries events of run "
                             f"{others[0][:120]!r}; a run's key signs only that run's events.")
        elif self.require_signature and run_ids:
            logger.warning("backend callback refused (403): unsigned callback for run %r", run_ids[0][:120])
            return 403, (f"Unsigned callback for run {run_ids[0][:120]!r}: this executor requires signed "
                         "callbacks (executor_config.require_signed_callbacks); Wove 2.x workers do not sign.")
        try:
            events = decode_events(obj)
        except Exception as exc:  # ProtocolError, or cloudpickle missing
            logger.warning("backend callback rejected: %s", exc)
            return 400, f"Invalid callback: {exc}"
        if self._on_events is not None:
            self._on_events(events)
        else:
            for event in events:
                self._queue.put_nowait(event)
        return 204, ""

    def _verify_signature(self, scope: dict[str, Any], body: bytes) -> tuple[int, str]:
        """``(0, run_id)`` for a valid signed callback, ``(0, "")`` for an unsigned one, else an error."""
        if self._run_key is None:
            return 0, ""  # nothing to verify with: the token alone authenticates
        run_header = CALLBACK_RUN_HEADER.lower().encode()
        signature_header = CALLBACK_SIGNATURE_HEADER.lower().encode()
        run_value = signature = None
        for name, value in scope.get("headers", []):
            if name == run_header:
                run_value = value
            elif name == signature_header:
                signature = value
        if run_value is None and signature is None:
            return 0, ""
        if run_value is None or signature is None:
            return 400, (f"A signed callback needs both {CALLBACK_RUN_HEADER} and {CALLBACK_SIGNATURE_HEADER}; "
                         f"got only {CALLBACK_RUN_HEADER if signature is None else CALLBACK_SIGNATURE_HEADER}.")
        run_id = unquote(run_value.decode("latin-1"))
        if self._is_pending is not None and not self._is_pending(run_id):
            logger.warning("backend callback refused (404): no pending run %r; nothing in it was decoded",
                           run_id[:120])
            return 404, (f"Unknown run {run_id[:120]!r}: no run with that id is pending here (it finished, was "
                         "cancelled, or was never submitted); nothing in this callback was decoded.")
        key = self._run_key(run_id)
        if not key:
            logger.warning("backend callback refused (403): run %r has no callback key", run_id[:120])
            return 403, f"Run {run_id[:120]!r} has no callback key here; its callbacks cannot be verified."
        if not hmac.compare_digest(signature, sign_callback(key, run_id, body).encode()):
            logger.warning("backend callback refused (403): bad signature for run %r", run_id[:120])
            return 403, (f"Callback signature for run {run_id[:120]!r} does not match the run's key; "
                         "the body was changed or was not posted by the worker of this run.")
        return 0, run_id
