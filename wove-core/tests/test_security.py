"""wove.security: the Wove 2.x signing scheme, verification failures, the replay cache, the TLS rule."""

from __future__ import annotations

import hashlib
import hmac
import time

import pytest

from wove.security import (
    MissingCredentialsError,
    NetworkExecutorSecurity,
    canonical_http_target,
    ensure_secure_target,
    is_local_grpc_target,
    is_local_url,
)

SECRET = "correct horse battery staple"
BODY = b'{"type":"run_task"}'


def signed(**overrides: object) -> NetworkExecutorSecurity:
    return NetworkExecutorSecurity.from_config({"type": "signed", "secret": SECRET, **overrides})


def test_signature_follows_the_scheme_exactly() -> None:
    headers = signed(key="k1").headers_for(transport="http", target="/wove?x=1", body=BODY)
    canonical = "\n".join(["wove-v1", "http", "/wove?x=1", headers["X-Wove-Timestamp"], headers["X-Wove-Nonce"],
                           hashlib.sha256(BODY).hexdigest()])
    expected = "v1=" + hmac.new(SECRET.encode(), canonical.encode(), hashlib.sha256).hexdigest()
    assert headers["X-Wove-Signature"] == expected
    assert headers["X-Wove-Key"] == "k1"
    assert abs(int(headers["X-Wove-Timestamp"]) - time.time()) < 5
    metadata = dict(signed().metadata_for(transport="grpc", target="/svc/Send", body=BODY))
    assert set(metadata) == {"x-wove-key", "x-wove-timestamp", "x-wove-nonce", "x-wove-signature"}


def test_round_trip_and_each_failed_check_says_which() -> None:
    client, server = signed(), signed()
    good = client.headers_for(transport="http", target="/wove", body=BODY)
    server.verify_headers(headers=good, transport="http", target="/wove", body=BODY)
    cases = [
        ({}, MissingCredentialsError, "Missing Wove signature header"),
        ({**good, "X-Wove-Key": "other"}, PermissionError, "Unknown signing key id 'other'"),
        ({**good, "X-Wove-Timestamp": "soon"}, PermissionError, "not a number"),
        ({**good, "X-Wove-Signature": "v1=00"}, PermissionError, "Invalid signature"),
        (good, PermissionError, "Replayed request"),
    ]
    for headers, error, message in cases:
        with pytest.raises(error, match=message) as info:
            server.verify_headers(headers=headers, transport="http", target="/wove", body=BODY)
        assert SECRET not in str(info.value)
    fresh = client.headers_for(transport="http", target="/wove", body=BODY)
    with pytest.raises(PermissionError, match="Invalid signature"):
        server.verify_headers(headers=fresh, transport="http", target="/wove", body=BODY + b" ")
    with pytest.raises(PermissionError, match="Invalid signature"):
        server.verify_headers(headers=fresh, transport="http", target="/other", body=BODY)
    with pytest.raises(PermissionError, match="Invalid signature"):
        signed(secret="wrong").verify_headers(headers=fresh, transport="http", target="/wove", body=BODY)


@pytest.mark.parametrize(("offset", "message"), [(-400, "Expired signature"), (400, "in the future")])
def test_timestamps_outside_the_skew_are_rejected(monkeypatch: pytest.MonkeyPatch, offset: int, message: str) -> None:
    client = signed()
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + offset)
    headers = client.headers_for(transport="http", target="/wove", body=BODY)
    monkeypatch.setattr(time, "time", real)
    with pytest.raises(PermissionError, match=message):
        signed().verify_headers(headers=headers, transport="http", target="/wove", body=BODY)


def test_replay_cache_is_bounded() -> None:
    client, server = signed(), NetworkExecutorSecurity(mode="signed", secret=SECRET, max_nonces=10)
    for _ in range(50):
        headers = client.headers_for(transport="http", target="/w", body=b"")
        server.verify_headers(headers=headers, transport="http", target="/w", body=b"")
    assert len(server._nonces) <= 10


def test_bearer_and_none() -> None:
    bearer = NetworkExecutorSecurity.from_config({"type": "bearer", "token": "t0k"})
    assert bearer.headers_for(transport="http", target="/", body=b"") == {"Authorization": "Bearer t0k"}
    bearer.verify_headers(headers={"authorization": "Bearer t0k"}, transport="http", target="/", body=b"")
    with pytest.raises(MissingCredentialsError):
        bearer.verify_headers(headers={}, transport="http", target="/", body=b"")
    with pytest.raises(PermissionError, match="Invalid bearer token") as info:
        bearer.verify_headers(headers={"authorization": "Bearer nope"}, transport="http", target="/", body=b"")
    assert "t0k" not in str(info.value) and "t0k" not in repr(bearer)
    for config in (None, "none", {"type": "none"}):
        assert NetworkExecutorSecurity.from_config(config).headers_for(transport="http", target="/", body=b"") == {}


def test_env_references_are_read_at_resolve_and_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WOVE_TEST_SECRET", raising=False)
    security = NetworkExecutorSecurity.from_config("env:WOVE_TEST_SECRET")
    with pytest.raises(RuntimeError, match="'WOVE_TEST_SECRET' is not set"):
        security.resolve()
    monkeypatch.setenv("WOVE_TEST_SECRET", SECRET)
    assert security.resolve().headers_for(transport="http", target="/", body=b"")["X-Wove-Key"] == "default"
    assert SECRET not in repr(security)
    bearer = NetworkExecutorSecurity.from_config({"type": "bearer", "token_env": "WOVE_TEST_SECRET"}).resolve()
    assert bearer.headers_for(transport="http", target="/", body=b"")["Authorization"] == f"Bearer {SECRET}"


@pytest.mark.parametrize(("config", "error", "message"), [
    ("secret", ValueError, "must be 'none' or 'env:VARIABLE'"),
    (42, TypeError, "must be a dict"),
    ({"type": "magic"}, ValueError, "security.type must be one of"),
    ({"type": "signed"}, ValueError, "needs 'secret' or 'secret_env'"),
    ({"type": "signed", "secret": "s", "colour": "x"}, ValueError, "unknown key"),
    ({"type": "bearer"}, ValueError, "needs 'token' or 'token_env'"),
])
def test_bad_security_config(config: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        NetworkExecutorSecurity.from_config(config)


def test_locality_and_the_tls_rule() -> None:
    assert canonical_http_target("http://h:1/wove?a=b") == "/wove?a=b"
    assert canonical_http_target("ws://h:1") == "/"
    assert is_local_url("http://127.0.0.1:8000/x") and is_local_url("http://[::1]:1/") and is_local_url("http://localhost/")
    assert not is_local_url("http://10.0.0.5/")
    assert is_local_grpc_target("127.0.0.1:50051") and is_local_grpc_target("unix:/tmp/s") and is_local_grpc_target("dns:///localhost:1")
    assert not is_local_grpc_target("workers.internal:50051")
    none = NetworkExecutorSecurity()
    kwargs = {"environment": "reports", "executor": "http", "target": "http://workers:9000", "security": none}
    with pytest.raises(ValueError, match=r"Environment 'reports' sends to http://workers:9000 without TLS.*insecure=True"):
        ensure_secure_target(local=False, tls=False, insecure=False, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="without authentication"):
        ensure_secure_target(local=False, tls=True, insecure=False, **kwargs)  # type: ignore[arg-type]
    ensure_secure_target(local=False, tls=False, insecure=True, **kwargs)  # type: ignore[arg-type]
    ensure_secure_target(local=True, tls=False, insecure=False, **kwargs)  # type: ignore[arg-type]
