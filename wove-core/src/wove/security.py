"""Signing and verification of network executor requests (the Wove 2.x scheme).

Signed requests carry ``X-Wove-Key``, ``X-Wove-Timestamp``, ``X-Wove-Nonce`` and
``X-Wove-Signature`` (gRPC: the same names in lower case as metadata). The signature is
``v1=`` + hex HMAC-SHA256(secret, canonical) where canonical is the lines ``wove-v1``,
transport, target, timestamp, nonce and the hex SHA-256 of the body joined with ``\\n``.
Verification runs on raw bytes, before anything is decoded or unpickled.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "MissingCredentialsError",
    "NetworkExecutorSecurity",
    "canonical_http_target",
    "ensure_secure_target",
    "is_local_grpc_target",
    "is_local_host",
    "is_local_url",
]

_KEY, _TIMESTAMP, _NONCE, _SIGNATURE = "X-Wove-Key", "X-Wove-Timestamp", "X-Wove-Nonce", "X-Wove-Signature"
MODES = ("none", "signed", "bearer")


class MissingCredentialsError(PermissionError):
    """The request carries no credentials at all (HTTP 401 / gRPC UNAUTHENTICATED).

    Any other failed check raises a plain :class:`PermissionError` (HTTP 403 /
    PERMISSION_DENIED): the credentials are there but wrong, expired or replayed.
    """


class NetworkExecutorSecurity:
    """Authentication for network executors and worker services.

    Args:
        mode: ``none``, ``signed`` or ``bearer``.
        secret: HMAC secret (signed); ``secret_env`` names an environment variable
            read by :meth:`resolve` instead.
        key: key id sent as ``X-Wove-Key`` (default ``default``).
        token / token_env: bearer token, or the variable holding it.
        clock_skew_seconds: accepted timestamp distance (default 300).
        max_nonces: replay cache bound (entries); they also expire with the skew window.
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
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"security type must be one of {', '.join(map(repr, MODES))}, got {mode!r}.")
        if mode == "signed" and secret is None and not secret_env:
            raise ValueError("signed security needs 'secret' or 'secret_env' (or use security='env:VARIABLE').")
        if mode == "bearer" and token is None and not token_env:
            raise ValueError("bearer security needs 'token' or 'token_env'.")
        if not isinstance(clock_skew_seconds, (int, float)) or clock_skew_seconds <= 0:
            raise ValueError(f"clock_skew_seconds must be a positive number, got {clock_skew_seconds!r}.")
        self.mode = mode
        self.key = str(key)
        self.clock_skew_seconds = float(clock_skew_seconds)
        self._secret = secret.encode("utf-8") if isinstance(secret, str) else secret
        self._secret_env = secret_env
        self._token = token
        self._token_env = token_env
        self._nonces: OrderedDict[str, float] = OrderedDict()
        self._max_nonces = max_nonces

    def __repr__(self) -> str:  # never shows the secret
        source = f" from ${self._secret_env or self._token_env}" if (self._secret_env or self._token_env) else ""
        return f"NetworkExecutorSecurity(mode={self.mode!r}, key={self.key!r}{source})"

    @classmethod
    def from_config(cls, config: Any) -> NetworkExecutorSecurity:
        """Build from an ``executor_config.security`` value.

        Accepts ``None``/``"none"``/``{"type": "none"}``, ``"env:VAR"``,
        ``{"type": "signed", "secret"|"secret_env", "key"?, "clock_skew_seconds"?}`` and
        ``{"type": "bearer", "token"|"token_env"}``. Environment variables are read by
        :meth:`resolve` (called at ``start()``), so a missing one fails there.
        """
        if config is None or config == "none":
            return cls()
        if isinstance(config, NetworkExecutorSecurity):
            return config
        if isinstance(config, str):
            if config.startswith("env:") and len(config) > 4:
                return cls(mode="signed", secret_env=config[4:])
            raise ValueError(
                f"security string must be 'none' or 'env:VARIABLE', got {config[:40]!r}."
            )
        if not isinstance(config, dict):
            raise TypeError(
                f"security must be a dict, 'env:VARIABLE' or 'none', got {type(config).__name__}."
            )
        mode = config.get("type", "signed")
        allowed = {"none": {"type"}, "signed": {"type", "secret", "secret_env", "key", "clock_skew_seconds", "remember_nonces"},
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
        missing = [h for h in (_KEY, _TIMESTAMP, _NONCE, _SIGNATURE) if not values.get(h.lower())]
        if missing:
            raise MissingCredentialsError(
                f"Missing Wove signature header(s): {', '.join(missing)}; this worker requires signed requests."
            )
        key, timestamp = values[_KEY.lower()], values[_TIMESTAMP.lower()]
        nonce, signature = values[_NONCE.lower()], values[_SIGNATURE.lower()]
        if not hmac.compare_digest(key.encode(), self.key.encode()):
            raise PermissionError(f"Unknown signing key id {key[:64]!r}.")
        try:
            stamp = float(timestamp)
        except ValueError:
            raise PermissionError(f"Invalid X-Wove-Timestamp {timestamp[:32]!r}: not a number.") from None
        skew = time.time() - stamp
        if skew > self.clock_skew_seconds:
            raise PermissionError(f"Expired signature: timestamp is {skew:.0f}s old (clock_skew_seconds={self.clock_skew_seconds:g}).")
        if -skew > self.clock_skew_seconds:
            raise PermissionError(f"Signature timestamp is {-skew:.0f}s in the future (clock_skew_seconds={self.clock_skew_seconds:g}).")
        expected = self._signature(transport, target, body, timestamp, nonce)
        if not hmac.compare_digest(signature.encode(), expected.encode()):
            raise PermissionError("Invalid signature: the request was not signed with this secret, or was altered.")
        self._remember(nonce)

    def _remember(self, nonce: str) -> None:
        now = time.monotonic()
        horizon = now - 2 * self.clock_skew_seconds
        while self._nonces:
            _oldest, seen = next(iter(self._nonces.items()))
            if seen >= horizon and len(self._nonces) < self._max_nonces:
                break
            self._nonces.popitem(last=False)
        if nonce in self._nonces:
            raise PermissionError("Replayed request: this nonce was already used.")
        self._nonces[nonce] = now


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
            f"TLS ({'https:// or wss:// URLs' if executor != 'grpc' else 'secure=True'}) and executor_config.security; "
            f"set executor_config.insecure=True only for development."
        )
    if security.mode == "none":
        raise ValueError(
            f"Environment '{environment}' sends to {target} without authentication. Non-loopback targets "
            f"need executor_config.security (for example security='env:WOVE_SECRET'); set "
            f"executor_config.insecure=True only for development."
        )
