"""wove.security: the Wove 2.x signing scheme, verification failures, the replay cache, the TLS rule."""

from __future__ import annotations

import hashlib
import hmac
import time

import pytest

from wove.security import (
    MemoryNonceStore,
    MissingCredentialsError,
    NetworkExecutorSecurity,
    NonceStore,
    canonical_http_target,
    ensure_secure_target,
    is_local_grpc_target,
    is_local_url,
)

SECRET = "correct horse battery staple"
BODY = b'{"type":"run_task"}'


def signed(**overrides: object) -> NetworkExecutorSecurity:
    return NetworkExecutorSecurity.from_config({"type": "signed", "secret": SECRET, **overrides})


def hand_signed(timestamp: str, nonce: str, *, target: str = "/wove", body: bytes = BODY) -> dict[str, str]:
    """Headers signed by hand with any timestamp string (a hostile or careless client)."""
    canonical = "\n".join(["wove-v1", "http", target, timestamp, nonce, hashlib.sha256(body).hexdigest()])
    signature = "v1=" + hmac.new(SECRET.encode(), canonical.encode(), hashlib.sha256).hexdigest()
    return {"X-Wove-Key": "default", "X-Wove-Timestamp": timestamp, "X-Wove-Nonce": nonce,
            "X-Wove-Signature": signature}


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
        ({**good, "X-Wove-Timestamp": "soon"}, PermissionError, "not a number of integer Unix seconds"),
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


@pytest.mark.parametrize("timestamp", ["nan", "NaN", "inf", "-inf", "1e400", "1700000000.5", " 1700000000",
                                       "-1", "0x6553f100", "\u0661\u0667" + "\u0660" * 8])
def test_non_integer_timestamps_are_rejected_even_when_correctly_signed(timestamp: str) -> None:
    # float("nan") compares False with everything: such a request would never expire.
    with pytest.raises(PermissionError, match="not a number of integer Unix seconds"):
        signed().verify_headers(headers=hand_signed(timestamp, "n1"), transport="http", target="/wove", body=BODY)


def test_an_integer_timestamp_signed_by_hand_is_accepted_like_a_2x_client() -> None:
    server = signed()
    headers = hand_signed(str(int(time.time())), "hand-1")
    server.verify_headers(headers=headers, transport="http", target="/wove", body=BODY)
    with pytest.raises(PermissionError, match="Replayed request"):
        server.verify_headers(headers=headers, transport="http", target="/wove", body=BODY)


def test_a_full_replay_cache_rejects_new_requests_instead_of_forgetting_fresh_nonces() -> None:
    server = NetworkExecutorSecurity(mode="signed", secret=SECRET, max_nonces=10)
    now = str(int(time.time()))
    accepted = [hand_signed(now, f"nonce-{i}") for i in range(10)]
    for headers in accepted:
        server.verify_headers(headers=headers, transport="http", target="/wove", body=BODY)
    with pytest.raises(PermissionError, match=r"Replay cache is full.*raise max_nonces"):
        server.verify_headers(headers=hand_signed(now, "nonce-10"), transport="http", target="/wove", body=BODY)
    # every request accepted earlier, all still inside the window, stays a rejected replay
    for headers in accepted:
        with pytest.raises(PermissionError):
            server.verify_headers(headers=headers, transport="http", target="/wove", body=BODY)
    assert isinstance(server.nonce_store, MemoryNonceStore) and len(server.nonce_store) <= 10


def test_the_memory_store_is_bounded_and_forgets_only_expired_nonces(monkeypatch: pytest.MonkeyPatch) -> None:
    store = MemoryNonceStore(max_nonces=3)
    now = time.time()
    assert [store.seen("default", f"n-{i}", now + 300 + i) for i in range(3)] == [False] * 3
    assert len(store) == 3
    assert store.seen("default", "n-0", now + 300) is True
    with pytest.raises(PermissionError, match="Replay cache is full"):
        store.seen("default", "n-9", now + 300)
    assert len(store) <= 3
    # a later-expiring request still fits: the floor only covers what had to be dropped
    assert store.seen("default", "n-10", now + 400) is False
    # once the window has passed, expired nonces make room again
    monkeypatch.setattr(time, "time", lambda: now + 350)
    assert store.seen("default", "n-11", now + 650) is False
    assert len(store) == 2  # n-10 and n-11: the others expired
    with pytest.raises(ValueError, match="max_nonces must be a positive integer, got 0"):
        MemoryNonceStore(max_nonces=0)
    keyed = MemoryNonceStore()
    assert keyed.seen("k1", "same", now + 1000) is False
    assert keyed.seen("k2", "same", now + 1000) is False  # nonces are namespaced by key id
    assert keyed.seen("k1", "same", now + 1000) is True


class SharedStore:
    """A store two workers share (what a Redis-backed store gives; see docs/security.md)."""

    def __init__(self) -> None:
        self.keys: dict[tuple[str, str], float] = {}

    def seen(self, key: str, nonce: str, expires: float) -> bool:
        if (key, nonce) in self.keys:
            return True
        self.keys[(key, nonce)] = expires
        return False


def test_a_replay_to_a_second_worker_or_after_a_restart_needs_a_shared_store() -> None:
    headers = signed().headers_for(transport="http", target="/wove", body=BODY)
    # inherent to the 2.x scheme: two workers with their own in-memory caches both accept it
    for _worker in range(2):
        signed().verify_headers(headers=headers, transport="http", target="/wove", body=BODY)
    store = SharedStore()
    assert isinstance(store, NonceStore)
    first = signed(nonce_store=store)
    first.verify_headers(headers=headers, transport="http", target="/wove", body=BODY)
    second_worker_or_restarted = NetworkExecutorSecurity(mode="signed", secret=SECRET, nonce_store=store)
    with pytest.raises(PermissionError, match="Replayed request"):
        second_worker_or_restarted.verify_headers(headers=headers, transport="http", target="/wove", body=BODY)
    # the store is a worker-side setting: the 2.x client's headers are unchanged and accepted
    fresh = signed().headers_for(transport="http", target="/wove", body=BODY)
    second_worker_or_restarted.verify_headers(headers=fresh, transport="http", target="/wove", body=BODY)
    with pytest.raises(TypeError, match="seen"):
        signed(nonce_store=object())


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


def test_cli_strings_name_the_mode_and_the_variable() -> None:
    for text, mode, variable in [("env:S1", "signed", "S1"), ("signed:env:S2", "signed", "S2"),
                                 ("bearer:env:T1", "bearer", "T1")]:
        security = NetworkExecutorSecurity.from_config(text)
        assert security.mode == mode and f"${variable}" in repr(security)


@pytest.mark.parametrize(("config", "error", "message"), [
    ("secret", ValueError, "must be 'none' or 'env:VARIABLE'"),
    ("env:", ValueError, "'bearer:env:VARIABLE'"),
    ("bearer:env:", ValueError, "got 'bearer:env:'"),
    ("bearer:s3cret", ValueError, "environment variable"),
    ("signed:S", ValueError, "'signed:env:VARIABLE'"),
    ({"type": "signed", "secret": "s", "clock_skew_seconds": float("nan")}, ValueError, "positive, finite"),
    ({"type": "signed", "secret": "s", "max_nonces": 0}, ValueError, "max_nonces"),
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
