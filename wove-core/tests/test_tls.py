"""wove.tls: the one TLS vocabulary of the network executors, and the helpers that build it."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import pytest

from wove.errors import ConfigError
from wove.options import OptionSpec
from wove.tls import TLS_OPTIONS, TlsSettings, client_ssl_context, pem_credentials, tls_settings

trustme = pytest.importorskip("trustme")

SPEC = OptionSpec("demo", [TLS_OPTIONS])


def settings(config: dict[str, Any], url_tls: bool | None = None) -> TlsSettings:
    return tls_settings(SPEC.validate(config, environment="e"), executor="demo", environment="e", url_tls=url_tls)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("worker.test")
    client = ca.issue_cert("client.test")
    files = {"ca": folder / "ca.pem", "client_cert": folder / "client.pem", "client_key": folder / "client.key"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    client.cert_chain_pems[0].write_to_path(str(files["client_cert"]))
    client.private_key_pem.write_to_path(str(files["client_key"]))
    return {"authority": ca, "server": server, "client": client, **{k: str(v) for k, v in files.items()}}


def test_older_spellings_land_on_the_new_names(pki: dict[str, Any]) -> None:
    grpc_style = settings({"secure": True, "root_certificates": pki["ca"], "certificate_chain": pki["client_cert"],
                           "private_key": pki["client_key"]})
    assert (grpc_style.enabled, grpc_style.ca, grpc_style.cert, grpc_style.key) == (
        True, pki["ca"], pki["client_cert"], pki["client_key"])
    http_style = settings({"verify": pki["ca"], "cert": [pki["client_cert"], pki["client_key"]]}, url_tls=True)
    assert (http_style.ca, http_style.cert, http_style.key, http_style.verify) == (
        pki["ca"], pki["client_cert"], pki["client_key"], True)
    ws_style = settings({"ssl": True, "certfile": pki["client_cert"], "keyfile": pki["client_key"]}, url_tls=True)
    assert (ws_style.cert, ws_style.key) == (pki["client_cert"], pki["client_key"])
    # PEM text comes back as bytes; gRPC's default: TLS on when a CA is given
    text = Path(pki["ca"]).read_text()
    pem = settings({"ca_file": text})
    assert pem.enabled and pem.ca == text.encode()
    assert not settings({}).enabled and settings({}, url_tls=True).enabled


@pytest.mark.parametrize(("config", "url_tls", "message"), [
    ({"verify": "CA", "ca_file": "CA"}, True, r"verify is a CA bundle path .* and ca_file is set too; keep only ca_file"),
    ({"tls": False}, True, r"tls is False but the URL scheme says TLS is on; the URL decides: use a http:// or ws://"),
    ({"tls": True}, False, r"tls is True but the URL scheme says TLS is off"),
    ({"ca_file": "CA", "tls": False}, None, r"sets ca_file but TLS is off; set tls=true \(older spelling: secure\)"),
    ({"server_hostname": "w"}, False, r"sets server_hostname but TLS is off; use an https:// or wss:// URL"),
    ({"key_file": "CA"}, True, r"key_file \(older: keyfile, private_key\) is set without cert_file"),
    ({"cert": ["CA", "CA"], "key_file": "CA"}, True, r"cert_file is \[certfile, keyfile\] and key_file is set too"),
    ({"ssl": "yes"}, True, r"executor_config\.ssl must be true or false .*got 'yes'"),
    ({"root_certificates": "/no/such/ca.pem"}, None,
     r"executor_config\.root_certificates must be a PEM file path, PEM text or PEM bytes, got '/no/such/ca.pem'; "
     r"the file '/no/such/ca.pem' does not exist"),
    ({"tls": True, "secure": True}, None, r"sets both 'tls' and its older spelling 'secure'; keep only 'tls'"),
    ({"ca_flie": "x"}, None, r"key 'ca_flie' \(did you mean 'ca_file'\?\)"),
])
def test_contradictions_and_bad_values_are_config_errors(pki: dict[str, Any], config: dict[str, Any],
                                                         url_tls: bool | None, message: str) -> None:
    config = {key: (pki["ca"] if value == "CA" else [pki["ca"]] * 2 if value == ["CA", "CA"] else value)
              for key, value in config.items()}
    with pytest.raises(ConfigError, match=message):
        settings(config, url_tls)


def test_pem_credentials_gives_grpc_bytes_and_refuses_what_grpc_cannot_do(pki: dict[str, Any]) -> None:
    root, key, chain = pem_credentials(settings({"ca_file": pki["ca"], "cert_file": pki["client_cert"],
                                                 "key_file": pki["client_key"]}))
    assert root == Path(pki["ca"]).read_bytes()
    assert key == Path(pki["client_key"]).read_bytes() and chain == Path(pki["client_cert"]).read_bytes()
    with pytest.raises(ConfigError, match=r"verify=false is not possible on gRPC"):
        pem_credentials(settings({"tls": True, "verify": False}))
    with pytest.raises(ConfigError, match=r"needs executor_config.cert_file \(older: certificate_chain\) and key_file"):
        pem_credentials(settings({"cert_file": pki["client_cert"]}))
    context = ssl.create_default_context()
    assert client_ssl_context(settings({"ssl": context}, url_tls=True)) is context
    with pytest.raises(ConfigError, match=r"needs PEM material"):
        settings({"ssl": context})


async def _handshake(pki: dict[str, Any], client: ssl.SSLContext, server_hostname: str) -> str:
    """A real TLS server on 127.0.0.1 that requires a client certificate from the CA;
    returns the common name of the client certificate it saw."""
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    pki["server"].configure_cert(server_context)
    pki["authority"].configure_trust(server_context)
    server_context.verify_mode = ssl.CERT_REQUIRED
    seen: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peercert") or {}
        seen.append(repr(peer.get("subjectAltName")))
        writer.write(b"ok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname=server_hostname), 10)
        assert await asyncio.wait_for(reader.read(), 10) == b"ok"
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
    return seen[0]


async def test_client_ssl_context_from_pem_bytes_does_mutual_tls(pki: dict[str, Any]) -> None:
    tls = settings({"ca_file": pki["authority"].cert_pem.bytes(), "cert_file": pki["client"].cert_chain_pems[0].bytes(),
                    "key_file": pki["client"].private_key_pem.bytes(), "server_hostname": "worker.test"},
                   url_tls=True)
    assert "client.test" in await _handshake(pki, client_ssl_context(tls), tls.server_hostname or "")
    with pytest.raises(ssl.SSLCertVerificationError, match=r"worker\.test|match|mismatch"):
        await _handshake(pki, client_ssl_context(tls), "other.test")
    unverified = client_ssl_context(settings({"verify": False, "cert_file": pki["client_cert"],
                                              "key_file": pki["client_key"]}, url_tls=True))
    assert "client.test" in await _handshake(pki, unverified, "other.test")  # development only


def test_a_key_that_does_not_match_its_certificate_is_named(pki: dict[str, Any]) -> None:
    other = trustme.CA().issue_cert("x.test")
    tls = settings({"cert_file": pki["client"].cert_chain_pems[0].bytes(),
                    "key_file": other.private_key_pem.bytes()}, url_tls=True)
    with pytest.raises(ConfigError, match=r"cert_file/key_file do not load .* Check that key_file belongs to cert_file"):
        client_ssl_context(tls)
