"""Fixtures shared by every distribution's tests (pytest finds this file at the root)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "bench"))


@pytest.fixture(scope="session")
def wove2_python() -> Path:
    """Interpreter of a throwaway venv with wove==2.0.3 (the reference peer for interop tests)."""
    from _wove2 import wove2_python as build

    return build()


@dataclass
class ThrowawayVenv:
    """A fresh virtual environment: ``install(*requirements)``, then run ``python``."""

    python: Path
    bin: Path
    installer: list[str]
    #: the environment to run its programs with (no leaking VIRTUAL_ENV / PYTHONPATH)
    env: dict[str, str]

    def install(self, *requirements: str) -> None:
        result = subprocess.run([*self.installer, *requirements], capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, f"installing {requirements} failed:\n{result.stderr}"


@pytest.fixture
def throwaway_venv(tmp_path: Path) -> ThrowawayVenv:
    """A new venv in the test's temp dir (uv when available, else venv + pip)."""
    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    uv = shutil.which("uv")
    if uv:
        subprocess.run([uv, "venv", "--quiet", "--python", sys.executable, str(venv)], check=True, timeout=120)
        installer = [uv, "pip", "install", "--quiet", "--python", str(python)]
    else:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        installer = [str(python), "-m", "pip", "install", "--quiet"]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    return ThrowawayVenv(python=python, bin=venv / "bin", installer=installer, env=env)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """PEM files from a trustme CA: ``ca``, a server ``cert``/``key`` naming only
    ``worker.test``, and a ``client_cert``/``client_key`` for mutual TLS."""
    trustme = pytest.importorskip("trustme")
    folder = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server, client = ca.issue_cert("worker.test"), ca.issue_cert("client.test")
    files = {name: str(folder / f"{name}.pem") for name in ("ca", "cert", "key", "client_cert", "client_key")}
    ca.cert_pem.write_to_path(files["ca"])
    server.cert_chain_pems[0].write_to_path(files["cert"])
    server.private_key_pem.write_to_path(files["key"])
    client.cert_chain_pems[0].write_to_path(files["client_cert"])
    client.private_key_pem.write_to_path(files["client_key"])
    return files



def require_service(name: str, host: str, port: int, how_to_start: str) -> None:
    """Skip the test when ``name`` does not answer on ``host:port`` (fail instead under ``CI=true``).

    The message names the service, the address and ``how_to_start`` it.
    """
    import socket

    try:
        socket.create_connection((host, port), timeout=2.0).close()
    except OSError as exc:
        message = f"{name} is not reachable at {host}:{port} ({exc}); {how_to_start}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message} (CI=true: a missing service fails the run)")
        pytest.skip(message)


@pytest.fixture
def service() -> object:
    """``service(name, host, port, how_to_start)``: :func:`require_service` as a fixture,
    for tests in distributions that cannot import this conftest."""
    return require_service


@pytest.fixture(scope="session")
def redis_service() -> tuple[str, int]:
    """The machine's Redis (127.0.0.1:6379, or ``WOVE_TEST_REDIS`` as ``host:port``), or a skip."""
    host, _, port = os.environ.get("WOVE_TEST_REDIS", "127.0.0.1:6379").partition(":")
    require_service("Redis", host, int(port or 6379),
                    "start it with `redis-server --daemonize yes` (Debian: apt install redis-server) "
                    "or set WOVE_TEST_REDIS=host:port")
    return host, int(port or 6379)


@pytest.fixture(scope="session")
def rabbitmq_service() -> tuple[str, int]:
    """The machine's RabbitMQ (127.0.0.1:5672, guest/guest, or ``WOVE_TEST_RABBITMQ`` as ``host:port``), or a skip."""
    host, _, port = os.environ.get("WOVE_TEST_RABBITMQ", "127.0.0.1:5672").partition(":")
    require_service("RabbitMQ", host, int(port or 5672),
                    "start it with `service rabbitmq-server start` (Debian: apt install rabbitmq-server) "
                    "or set WOVE_TEST_RABBITMQ=host:port")
    return host, int(port or 5672)
