"""Signing and verification of network executor requests (the Wove 2.x scheme).

Signed requests carry ``X-Wove-Key``, ``X-Wove-Timestamp``, ``X-Wove-Nonce`` and
``X-Wove-Signature`` (gRPC: the same names in lower case as metadata). The signature is
``v1=`` + hex HMAC-SHA256(secret, canonical) where canonical is the lines ``wove-v1``,
transport, target, timestamp, nonce and the hex SHA-256 of the body joined with ``\\n``.
Verification runs on raw bytes, before anything is decoded or unpickled.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import ipaddress
import os
import re
import secrets
import threading
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "MemoryNonceStore",
    "MissingCredentialsError",
    "NetworkExecutorSecurity",
    "NonceStore",
    "canonical_http_target",
    "ensure_secure_target",
    "is_local_grpc_target",
    "is_local_host",
    "is_local_url",
]

_KEY, _TIMESTAMP, _NONCE, _SIGNATURE = "X-Wove-Key", "X-Wove-Timestamp", "X-Wove-Nonce", "X-Wove-Signature"
MODES = ("none", "signed", "bearer")
_INTEGER_SECONDS = re.compile(r"[0-9]{1,15}")
#: The forms ``from_config`` accepts as a string (``wove worker --security``).
SECURITY_STRING_FORMS = "'none', 'env:VAR', 'signed:env:VAR' or 'bearer:env:VAR'"


class MissingCredentialsError(PermissionError):
    """The request carries no credentials at all (HTTP 401 / gRPC UNAUTHENTICATED).

    Any other failed check raises a plain :class:`PermissionError` (HTTP 403 /
    PERMISSION_DENIED): the credentials are there but wrong, expired or replayed.
    """


@runtime_checkable
class NonceStore(Protocol):
    """Where a verifier remembers the nonces of accepted signed requests.

    The default, :class:`MemoryNonceStore`, lives in one worker process: a request
    replayed to another worker with the same secret, or to the same worker after a
    restart, is not recognised. Share one store between workers (and keep it across
    restarts) to close that: see ``docs/security.md`` for a Redis-backed store.
    """

    def seen(self, key: str, nonce: str, expires: float) -> bool:
        """Record ``nonce`` (of signing key id ``key``) until Unix time ``expires``.

        Returns:
            True when the nonce was recorded before and has not expired (a replay; the
            request is rejected); False when it is new (it is now recorded).

        Raises:
            PermissionError: the store cannot remember the nonce (the request is
                rejected with this message).
        """
        ...


class MemoryNonceStore:
    """The in-process :class:`NonceStore`: at most ``max_nonces`` nonces, never forgetting
    a fresh one.

    A nonce is kept until its request's timestamp leaves the clock-skew window (after
    that the timestamp check rejects a replay). When the store is full of nonces that
    have not expired, the one expiring first is dropped and its expiry becomes a
    *floor*: a request expiring at or before the floor is rejected ("replay cache is
    full"), so a dropped nonce can never be replayed. Under sustained load above
    ``max_nonces`` per skew window this shrinks the accepted window instead of
    reopening replays.
    """

    def __init__(self, max_nonces: int = 100_000) -> None:
        if not isinstance(max_nonces, int) or isinstance(max_nonces, bool) or max_nonces < 1:
            raise ValueError(f"max_nonces must be a positive integer, got {max_nonces!r}.")
        self.max_nonces = max_nonces
        self._entries: dict[tuple[str, str], float] = {}
        self._expiry: list[tuple[float, str, str]] = []
        self._floor = float("-inf")
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def _drop_first(self) -> None:
        expires, key, nonce = heapq.heappop(self._expiry)
        self._entries.pop((key, nonce), None)
        self._floor = max(self._floor, expires)

    def seen(self, key: str, nonce: str, expires: float) -> bool:
        with self._lock:
            now = time.time()
            while self._expiry and self._expiry[0][0] < now:
                self._drop_first()
            if (key, nonce) in self._entries:
                return True
            if len(self._entries) >= self.max_nonces:
                self._drop_first()
            if expires <= self._floor:
                raise PermissionError(
                    f"Replay cache is full: it holds {self.max_nonces} nonces that are still inside the "
                    f"clock-skew window, and this request (valid until Unix time {expires:.0f}) could no "
                    f"longer be checked for replay. Retry later with a fresh signature, or raise "
                    f"max_nonces on the worker."
                )
            self._entries[(key, nonce)] = expires
            heapq.heappush(self._expiry, (expires, key, nonce))
            return False


class NetworkExecutorSecurity:
    """Authentication for network executors and worker services.

    Args:
        mode: ``none``, ``signed`` or ``bearer``.
        secret: HMAC secret (signed); ``secret_env`` names an environment variable
            read by :meth:`resolve` instead.
        key: key id sent as ``X-Wove-Key`` (default ``default``).
        token / token_env: bearer token, or the variable holding it.
        clock_skew_seconds: accepted timestamp distance (default 300).
        max_nonces: bound of the default in-memory replay cache (entries); they also
            expire with the skew window. A full cache rejects requests rather than forget
            a fresh nonce.
        nonce_store: a shared :class:`NonceStore` (for example backed by Redis) instead of
            the in-memory cache, so a request replayed to another worker with the same
            secret, or after a restart, is rejected too.
    """

    def __init__(
        self,
        *,
        mode: str = "none",
        secret: str | bytes | None = None,
        secret_env: str | None = None,
        key: str = "default",
        token: str | None = None,
        token_env: str | None = None,
        clock_skew_seconds: float = 300.0,
        max_nonces: int = 100_000,
        nonce_store: NonceStore | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"security type must be one of {', '.join(map(repr, MODES))}, got {mode!r}.")
        if mode == "signed" and secret is None and not secret_env:
            raise ValueError("signed security needs 'secret' or 'secret_env' (or use security='env:VARIABLE').")
        if mode == "bearer" and token is None and not token_env:
            raise ValueError("bearer security needs 'token' or 'token_env'.")
        if (not isinstance(clock_skew_seconds, (int, float)) or isinstance(clock_skew_seconds, bool)
                or not clock_skew_seconds > 0 or clock_skew_seconds == float("inf")):
            raise ValueError(f"clock_skew_seconds must be a positive, finite number, got {clock_skew_seconds!r}.")
        if nonce_store is not None and not callable(getattr(nonce_store, "seen", None)):
            raise TypeError(
                f"nonce_store must have a seen(key, nonce, expires) -> bool method, got {type(nonce_store).__name__}."
            )
        self.mode = mode
        self.key = str(key)
        self.clock_skew_seconds = float(clock_skew_seconds)
        self._secret = secret.encode("utf-8") if isinstance(secret, str) else secret
        self._secret_env = secret_env
        self._token = token
        self._token_env = token_env
        #: where accepted nonces are remembered (see :class:`NonceStore`)
        self.nonce_store: NonceStore = nonce_store if nonce_store is not None else MemoryNonceStore(max_nonces)

    def __repr__(self) -> str:  # never shows the secret
        source = f" from ${self._secret_env or self._token_env}" if (self._secret_env or self._token_env) else ""
        return f"NetworkExecutorSecurity(mode={self.mode!r}, key={self.key!r}{source})"

    @classmethod
    def from_config(cls, config: Any) -> NetworkExecutorSecurity:
        """Build from an ``executor_config.security`` value (or ``wove worker --security``).

        Accepts ``None``/``"none"``/``{"type": "none"}``; the strings ``"env:VAR"`` and
        ``"signed:env:VAR"`` (signed with the secret in VAR) and ``"bearer:env:VAR"``
        (bearer token in VAR); ``{"type": "signed", "secret"|"secret_env", "key"?,
        "clock_skew_seconds"?, "max_nonces"?, "nonce_store"?}`` and ``{"type": "bearer",
        "token"|"token_env"}``. Environment variables are read by :meth:`resolve` (called
        at ``start()``), so a missing one fails there.

        Raises:
            ValueError / TypeError: the value is none of these (the message lists them).
        """
        if config is None or config == "none":
            return cls()
        if isinstance(config, NetworkExecutorSecurity):
            return config
        if isinstance(config, str):
            return cls._from_string(config)
        if not isinstance(config, dict):
            raise TypeError(
                f"security must be a dict, 'env:VARIABLE' or 'none', got {type(config).__name__}."
            )
        mode = config.get("type", "signed")
        allowed = {"none": {"type"},
                   "signed": {"type", "secret", "secret_env", "key", "clock_skew_seconds", "remember_nonces",
                              "max_nonces", "nonce_store"},
                   "bearer": {"type", "token", "token_env"}}.get(mode)
        if allowed is None:
            raise ValueError(f"security.type must be one of 'signed', 'bearer', 'none', got {mode!r}.")
        unknown = sorted(set(config) - allowed)
        if unknown:
            raise ValueError(f"security ({mode}) has unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}.")
        if mode == "none":
            return cls()
        if mode == "bearer":
            return cls(mode="bearer", token=config.get("token"), token_env=config.get("token_env"))
        return cls(
            mode="signed",
            secret=config.get("secret"),
            secret_env=config.get("secret_env"),
            key=str(config.get("key", "default")),
            clock_skew_seconds=float(config.get("clock_skew_seconds", 300.0)),
            max_nonces=config.get("max_nonces", 100_000),
            nonce_store=config.get("nonce_store"),
        )

    @classmethod
    def _from_string(cls, config: str) -> NetworkExecutorSecurity:
        mode, _, rest = config.partition(":")
        if mode == "env":
            mode, rest = "signed", config
        if mode in ("signed", "bearer") and rest.startswith("env:"):
            variable = rest[4:]
            if variable and not any(c.isspace() for c in variable):
                if mode == "signed":
                    return cls(mode="signed", secret_env=variable)
                return cls(mode="bearer", token_env=variable)
        hint = ""
        if mode == "bearer" and not rest.startswith("env:"):
            hint = " Put the token in an environment variable and write 'bearer:env:VAR' (a token on a command line is visible to other users)."
        raise ValueError(
            f"security string must be 'none' or 'env:VARIABLE' (also 'signed:env:VARIABLE', "
            f"'bearer:env:VARIABLE'), got {config[:40]!r}.{hint}"
        )

    def resolve(self) -> NetworkExecutorSecurity:
        """Read secrets from their environment variables.

        Raises:
            RuntimeError: a named variable is unset or empty (the message names it,
                never a value).
        """
        if self.mode == "signed" and self._secret is None:
            self._secret = _read_env(self._secret_env, "signing secret").encode("utf-8")
        if self.mode == "bearer" and self._token is None:
            self._token = _read_env(self._token_env, "bearer token")
        return self

    # -- signing ---------------------------------------------------------------
    def headers_for(self, *, transport: str, target: str, body: bytes) -> dict[str, str]:
        """Headers for one outbound request (HTTP, WebSocket handshake)."""
        if self.mode == "none":
            return {}
        self.resolve()
        if self.mode == "bearer":
            return {"Authorization": f"Bearer {self._token}"}
        timestamp = str(int(time.time()))
        nonce = secrets.token_urlsafe(18)
        return {
            _KEY: self.key,
            _TIMESTAMP: timestamp,
            _NONCE: nonce,
            _SIGNATURE: self._signature(transport, target, body, timestamp, nonce),
        }

    def metadata_for(self, *, transport: str, target: str, body: bytes) -> tuple[tuple[str, str], ...]:
        """Lower-case gRPC metadata pairs for one outbound call."""
        return tuple((k.lower(), v) for k, v in self.headers_for(transport=transport, target=target, body=body).items())

    def _signature(self, transport: str, target: str, body: bytes, timestamp: str, nonce: str) -> str:
        assert self._secret is not None
        canonical = "\n".join(["wove-v1", transport, target, timestamp, nonce, hashlib.sha256(body).hexdigest()])
        return "v1=" + hmac.new(self._secret, canonical.encode("utf-8"), hashlib.sha256).hexdigest()

    # -- verification ----------------------------------------------------------
    def verify_headers(self, *, headers: Mapping[str, Any], transport: str, target: str, body: bytes) -> None:
        """Verify HTTP/WebSocket request headers.

        Raises:
            PermissionError: says which check failed (missing headers, wrong key, bad
                signature, expired or future timestamp, replayed nonce, bad token).
        """
        self._verify({str(k).lower(): str(v) for k, v in headers.items()}, transport, target, body)

    def verify_metadata(self, *, metadata: Iterable[tuple[str, Any]], transport: str, target: str, body: bytes) -> None:
        """Verify gRPC metadata (see :meth:`verify_headers`)."""
        self._verify({str(k).lower(): (v.decode() if isinstance(v, bytes) else str(v)) for k, v in metadata},
                     transport, target, body)

    def _verify(self, values: dict[str, str], transport: str, target: str, body: bytes) -> None:
        if self.mode == "none":
            return
        self.resolve()
        if self.mode == "bearer":
            actual = values.get("authorization", "")
            if not actual:
                raise MissingCredentialsError("Missing Authorization: Bearer header; this worker requires bearer requests.")
            if not hmac.compare_digest(actual.encode(), f"Bearer {self._token}".encode()):
                raise PermissionError("Invalid bearer token.")
            return
        key, timestamp, stamp = self._signed_headers(values)
        nonce, signature = values[_NONCE.lower()], values[_SIGNATURE.lower()]
        expected = self._signature(transport, target, body, timestamp, nonce)
        if not hmac.compare_digest(signature.encode(), expected.encode()):
            raise PermissionError("Invalid signature: the request was not signed with this secret, or was altered.")
        if self.nonce_store.seen(key, nonce, stamp + self.clock_skew_seconds):
            raise PermissionError("Replayed request: this nonce was already used.")

    def precheck_headers(self, headers: Mapping[str, Any]) -> None:
        """Check what the headers alone can prove, before a request body is read.

        A worker calls this first, so an anonymous or forged request is refused without
        buffering its body; :meth:`verify_headers` still runs on the body afterwards
        (signature and nonce). Signed: the four headers are present, the key id is ours,
        the timestamp is integer seconds within ``clock_skew_seconds``. Bearer: the
        whole check (the token does not depend on the body). Records nothing.

        Raises:
            MissingCredentialsError: no credentials at all (HTTP 401).
            PermissionError: a wrong key id or token, or a bad, expired or future
                timestamp (HTTP 403).
        """
        if self.mode == "none":
            return
        values = {str(k).lower(): str(v) for k, v in headers.items()}
        if self.mode == "bearer":
            self._verify(values, "", "", b"")
            return
        self._signed_headers(values)

    def _signed_headers(self, values: dict[str, str]) -> tuple[str, str, int]:
        """The checks the signed headers alone allow: all four present, our key id, an
        integer timestamp within the clock skew. Returns ``(key, timestamp, seconds)``."""
        missing = [h for h in (_KEY, _TIMESTAMP, _NONCE, _SIGNATURE) if not values.get(h.lower())]
        if missing:
            raise MissingCredentialsError(
                f"Missing Wove signature header(s): {', '.join(missing)}; this worker requires signed requests."
            )
        key, timestamp = values[_KEY.lower()], values[_TIMESTAMP.lower()]
        if not hmac.compare_digest(key.encode(), self.key.encode()):
            raise PermissionError(f"Unknown signing key id {key[:64]!r}.")
        if not _INTEGER_SECONDS.fullmatch(timestamp):
            raise PermissionError(
                f"Invalid X-Wove-Timestamp {timestamp[:32]!r}: not a number of integer Unix seconds "
                f"(the scheme sends digits only, such as {int(time.time())})."
            )
        stamp = int(timestamp)
        skew = time.time() - stamp
        if skew > self.clock_skew_seconds:
            raise PermissionError(f"Expired signature: timestamp is {skew:.0f}s old (clock_skew_seconds={self.clock_skew_seconds:g}).")
        if -skew > self.clock_skew_seconds:
            raise PermissionError(f"Signature timestamp is {-skew:.0f}s in the future (clock_skew_seconds={self.clock_skew_seconds:g}).")
        return key, timestamp, stamp


def _read_env(name: str | None, label: str) -> str:
    value = os.environ.get(name or "")
    if not value:
        raise RuntimeError(f"The {label} environment variable {name!r} is not set (or is empty). Set it before starting.")
    return value


def canonical_http_target(url_or_path: str) -> str:
    """The signed target of an HTTP/WebSocket request: path plus ``?query``."""
    parsed = urllib.parse.urlsplit(url_or_path)
    path = parsed.path or "/"
    return f"{path}?{parsed.query}" if parsed.query else path


def is_local_host(host: str | None) -> bool:
    """localhost, 127.0.0.0/8 and ::1."""
    if not host:
        return False
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_local_url(url: str) -> bool:
    return is_local_host(urllib.parse.urlsplit(url).hostname)


def is_local_grpc_target(target: str) -> bool:
    """gRPC targets on loopback or unix sockets."""
    target = target.strip()
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    for prefix in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(prefix):
            target = target[len(prefix):]
            break
    host = target.rsplit("@", 1)[-1].split("/", 1)[0]
    if host.startswith("[") and "]" in host:
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    return is_local_host(host)


def ensure_secure_target(
    *,
    environment: str,
    executor: str,
    target: str,
    local: bool,
    tls: bool,
    security: NetworkExecutorSecurity,
    insecure: bool,
) -> None:
    """Enforce at ``start()``: non-loopback targets need TLS and security.

    Raises:
        ValueError: says the environment, the target and the fix.
    """
    if insecure or local:
        return
    if not tls:
        raise ValueError(
            f"Environment '{environment}' sends to {target} without TLS. Non-loopback targets need "
            f"TLS ({'https:// or wss:// URLs' if executor != 'grpc' else 'executor_config.tls=true'}) and executor_config.security; "
            f"set executor_config.insecure=True only for development."
        )
    if security.mode == "none":
        raise ValueError(
            f"Environment '{environment}' sends to {target} without authentication. Non-loopback targets "
            f"need executor_config.security (for example security='env:WOVE_SECRET'); set "
            f"executor_config.insecure=True only for development."
        )
