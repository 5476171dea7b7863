"""The client TLS vocabulary of the network executors (http, grpc, websocket), once.

Every network executor includes :data:`TLS_OPTIONS` in its :class:`~wove.options.OptionSpec`
and builds its TLS material through this module::

    config = SPEC.validate(environment_config, environment=name)
    tls = tls_settings(config, executor="websocket", environment=name, url_tls=url.startswith("wss:"))
    context = client_ssl_context(tls)           # http and websocket take an ssl.SSLContext
    root, key, chain = pem_credentials(tls)     # grpc takes PEM bytes

The keys (``docs/configuration.md`` has the table):

==================  ==========================================  ==============================
key                 older spellings (aliases)                   meaning
==================  ==========================================  ==============================
``tls``             ``secure`` (grpc), ``ssl`` (websocket)      TLS on or off; http/websocket:
                                                                the URL scheme decides, a
                                                                contradicting value is an error
``ca_file``         ``root_certificates`` (grpc)                CA bundle that verifies the worker
``cert_file``       ``cert`` (http), ``certfile`` (websocket),  client certificate (mutual TLS)
                    ``certificate_chain`` (grpc)
``key_file``        ``keyfile`` (websocket), ``private_key``     its private key
                    (grpc)
``verify``          —                                           false: no certificate check
``server_hostname`` —                                           the name the certificate is
                                                                checked against (and SNI)
==================  ==========================================  ==============================

Older value forms keep working too: http's ``verify`` as a CA bundle path (it becomes
``ca_file``), http's ``cert`` as ``[certfile, keyfile]``, websocket's ``ssl`` as an
:class:`ssl.SSLContext` used as is. ``ca_file``, ``cert_file`` and ``key_file`` take a file
path, PEM text or PEM bytes on every transport.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .options import BOOL, INVALID, STR, Kind, Option, OptionSpec, where

__all__ = [
    "INSECURE_OPTION",
    "PEM",
    "TLS_OPTIONS",
    "TlsSettings",
    "client_ssl_context",
    "pem_bytes",
    "pem_credentials",
    "tls_settings",
]

_PEM_MARK = "-----BEGIN"


def _pem(value: Any) -> Any:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str) and _PEM_MARK in value:
        return value.encode("ascii")
    if not isinstance(value, (str, os.PathLike)):
        return INVALID
    path = os.fspath(value)
    if not os.path.isfile(path):
        raise ValueError(f"the file {path!r} does not exist (or is not a file); give the path of a PEM file")
    return str(path)


def _tls_switch(value: Any) -> Any:
    if isinstance(value, (bool, ssl.SSLContext)):
        return value
    return INVALID


def _verify(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    return _pem(value)  # the older http form: a CA bundle path


def _cert(value: Any) -> Any:
    if isinstance(value, (list, tuple)):  # the older http form: [certfile, keyfile]
        if len(value) not in (1, 2):
            raise ValueError(f"a list must be [certfile, keyfile], got {len(value)} items")
        return tuple(_checked_pem(item) for item in value)
    return _pem(value)


def _checked_pem(value: Any) -> Any:
    result = _pem(value)
    if result is INVALID:
        raise ValueError(f"{value!r} is not a path, PEM text or bytes")
    return result


#: A PEM value: a file path, PEM text or PEM bytes (a path must name an existing file;
#: PEM text comes back as bytes).
PEM = Kind("a PEM file path, PEM text or PEM bytes", _pem)

#: The TLS keys every network executor accepts (see the module docstring).
TLS_OPTIONS = OptionSpec("tls", [
    Option("tls", Kind("true or false (websocket/http: or an ssl.SSLContext used as is)", _tls_switch),
           aliases=("secure", "ssl"),
           doc="TLS on or off (http/websocket: the URL scheme decides; grpc: default on when ca_file or "
               "cert_file is set)"),
    Option("ca_file", PEM, aliases=("root_certificates",),
           doc="CA bundle (PEM) that verifies the worker's certificate (default: the system CAs)"),
    Option("cert_file", Kind("a PEM file path, PEM text or bytes (http: or [cert_file, key_file])", _cert),
           aliases=("cert", "certfile", "certificate_chain"),
           doc="client certificate chain (PEM) for mutual TLS"),
    Option("key_file", PEM, aliases=("keyfile", "private_key"), doc="private key (PEM) of cert_file"),
    Option("verify", Kind("true or false (http: or a CA bundle path, as ca_file)", _verify), True,
           doc="false skips the certificate and host name check (development only; not on grpc)"),
    Option("server_hostname", STR,
           doc="host name the worker's certificate must name, and the TLS SNI (default: the URL/target host)"),
])

#: ``insecure``, which every network executor accepts beside ``security``.
INSECURE_OPTION = Option("insecure", BOOL, False,
                         "allow a non-loopback target without TLS or without security (development only)")


@dataclass(frozen=True)
class TlsSettings:
    """The TLS keys of one executor_config, checked together (see :func:`tls_settings`).

    Attributes:
        enabled: TLS is on.
        ca: CA bundle: a file path (str) or PEM bytes; None: the system CAs.
        cert / key: client certificate chain and key (path or PEM bytes), or None.
        verify: check the worker's certificate and host name.
        server_hostname: the name to check the certificate against (and send as SNI).
        context: an ``ssl.SSLContext`` given as is (``ssl``/``tls``), used unchanged.
        where: the message prefix (``"Environment 'x': "``).
    """

    enabled: bool
    ca: str | bytes | None = None
    cert: str | bytes | None = None
    key: str | bytes | None = None
    verify: bool = True
    server_hostname: str | None = None
    context: ssl.SSLContext | None = None
    where: str = ""


def tls_settings(config: Mapping[str, Any], *, executor: str, environment: str | None = None,
                 url_tls: bool | None = None) -> TlsSettings:
    """Check the TLS keys of a validated ``config`` together.

    Args:
        config: the result of :meth:`OptionSpec.validate` for a spec that includes
            :data:`TLS_OPTIONS` (every key present, aliases resolved).
        executor: the executor's name, for messages.
        environment: the environment's name, for messages.
        url_tls: for a URL transport, whether the scheme is the TLS one (``https``,
            ``wss``); None for gRPC, where ``tls`` (default: on when ``ca_file`` or
            ``cert_file`` is set) decides.

    Raises:
        ConfigError: keys that contradict each other (the keys, the values and the fix).
    """
    prefix = where(environment) or f"{executor} executor: "
    switch = config.get("tls")
    ca, cert, key = config.get("ca_file"), config.get("cert_file"), config.get("key_file")
    verify = config.get("verify", True)
    if isinstance(verify, (str, bytes)):  # http's older form: verify = CA bundle path
        if ca is not None:
            raise ConfigError(f"{prefix}executor_config.verify is a CA bundle path ({verify!r}) and ca_file is set "
                              "too; keep only ca_file (and verify=true).")
        ca, verify = verify, True
    if isinstance(cert, tuple):  # http's older form: cert = [certfile, keyfile]
        if len(cert) == 2 and key is not None:
            raise ConfigError(f"{prefix}executor_config.cert_file is [certfile, keyfile] and key_file is set too; "
                              "set cert_file and key_file separately.")
        cert, key = cert[0], (cert[1] if len(cert) == 2 else key)
    context = switch if isinstance(switch, ssl.SSLContext) else None
    if url_tls is None:
        if context is not None:
            raise ConfigError(f"{prefix}executor_config.tls is an ssl.SSLContext; the {executor} executor needs PEM "
                              "material: set tls=true and ca_file, cert_file and key_file instead.")
        enabled = bool(switch) if switch is not None else (ca is not None or cert is not None)
    else:
        enabled = url_tls
        if switch is not None and context is None and bool(switch) != url_tls:
            scheme = "https:// or wss://" if switch else "http:// or ws://"
            raise ConfigError(f"{prefix}executor_config.tls is {switch!r} but the URL scheme says TLS is "
                              f"{'on' if url_tls else 'off'}; the URL decides: use a {scheme} URL (or drop tls).")
    material = {"ca_file": ca, "cert_file": cert, "key_file": key, "server_hostname": config.get("server_hostname")}
    given = [name for name, value in material.items() if value is not None]
    if not enabled and (given or verify is False):
        names = ", ".join(given or ["verify"])
        fix = ("use an https:// or wss:// URL" if url_tls is not None else "set tls=true (older spelling: secure)")
        raise ConfigError(f"{prefix}executor_config sets {names} but TLS is off; {fix}, or drop {names}.")
    files = [name for name in given if name != "server_hostname"]
    if context is not None and (files or verify is False):
        raise ConfigError(f"{prefix}executor_config.ssl/tls is an ssl.SSLContext, used as is; drop "
                          f"{', '.join(files or ['verify'])} (configure the context instead).")
    if key is not None and cert is None:
        raise ConfigError(f"{prefix}executor_config.key_file (older: keyfile, private_key) is set without "
                          "cert_file (older: cert, certfile, certificate_chain); mutual TLS needs both.")
    return TlsSettings(enabled=enabled, ca=ca, cert=cert, key=key, verify=bool(verify),
                       server_hostname=config.get("server_hostname"), context=context, where=prefix)


def pem_bytes(value: str | bytes | os.PathLike[str]) -> bytes:
    """The PEM bytes of ``value``: bytes as they are, PEM text encoded, a path read.

    Raises:
        ConfigError: a file that cannot be read (names it).
    """
    if isinstance(value, bytes):
        return value
    text = os.fspath(value)
    if _PEM_MARK in text:
        return text.encode("ascii")
    try:
        return Path(text).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the PEM file {text!r}: {exc}. Give a readable PEM file, PEM text or "
                          "bytes.") from exc


def client_ssl_context(settings: TlsSettings) -> ssl.SSLContext:
    """The client ``ssl.SSLContext`` for ``settings`` (for http and websocket).

    Verifies the worker against ``ca`` (default: the system CAs) unless ``verify`` is
    false, and presents ``cert``/``key`` when set. A context given as is comes back
    unchanged.

    Raises:
        ConfigError: a certificate or key that does not load (names it and why).
    """
    if settings.context is not None:
        return settings.context
    prefix = settings.where
    try:
        if isinstance(settings.ca, bytes):
            context = ssl.create_default_context(cadata=settings.ca.decode("ascii"))
        else:
            context = ssl.create_default_context(cafile=settings.ca)
    except (ssl.SSLError, OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{prefix}executor_config.ca_file does not load as a PEM CA bundle: {exc}.") from exc
    if not settings.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if settings.cert is not None:
        try:
            _load_cert_chain(context, settings.cert, settings.key)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"{prefix}executor_config.cert_file/key_file do not load as a certificate chain "
                              f"and its private key: {exc}. Check that key_file belongs to cert_file.") from exc
    return context


def _load_cert_chain(context: ssl.SSLContext, cert: str | bytes, key: str | bytes | None) -> None:
    """``load_cert_chain`` for paths or PEM bytes (bytes go through a private temporary file,
    deleted at once: the ssl module loads certificates from files only)."""
    with tempfile.TemporaryDirectory(prefix="wove-tls-") as folder:
        def path(value: str | bytes | None, name: str) -> str | None:
            if value is None or isinstance(value, str):
                return value
            target = os.path.join(folder, name)
            with open(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as fh:
                fh.write(value)
            return target

        certfile = path(cert, "cert.pem")
        assert certfile is not None
        context.load_cert_chain(certfile, path(key, "key.pem"))


def pem_credentials(settings: TlsSettings) -> tuple[bytes | None, bytes | None, bytes | None]:
    """``(root_certificates, private_key, certificate_chain)`` as PEM bytes, for
    ``grpc.ssl_channel_credentials`` (None where not set).

    Raises:
        ConfigError: a file that cannot be read; a certificate without its key (gRPC
            takes them apart); ``verify=false`` (gRPC always verifies).
    """
    prefix = settings.where
    if not settings.verify:
        raise ConfigError(f"{prefix}executor_config.verify=false is not possible on gRPC (it always verifies the "
                          "worker's certificate); set ca_file to the CA that signed it, and server_hostname when "
                          "the certificate names another host.")
    if settings.cert is not None and settings.key is None:
        raise ConfigError(f"{prefix}mutual TLS on gRPC needs executor_config.cert_file (older: certificate_chain) "
                          "and key_file (older: private_key) as separate values; key_file is not set.")
    return tuple(None if value is None else pem_bytes(value)  # type: ignore[return-value]
                 for value in (settings.ca, settings.key, settings.cert))
