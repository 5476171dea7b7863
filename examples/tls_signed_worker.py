"""A worker service behind TLS, with signed requests.

Makes a throwaway certificate authority and a certificate for 127.0.0.1 (with trustme:
``pip install trustme``; in production the files come from your PKI), starts
``wove worker http`` with ``--certfile``/``--keyfile`` and ``--security env:WOVE_SECRET``,
and calls it through the ``https`` executor, which verifies the worker's certificate
(``ca_file``) and signs every request with the same secret. A client without the
secret is refused before anything it sent is unpickled.

Run it: ``uv run python examples/tls_signed_worker.py`` (from a checkout), or
``python tls_signed_worker.py`` with ``wove-executor-http`` and ``trustme`` installed.
"""

from __future__ import annotations

import asyncio
import os
import platform
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

import trustme

from wove.environment import EnvironmentExecutionError, ExecutorRuntime


def where_am_i(greeting: str) -> str:
    return f"{greeting} from {platform.node()}, pid {os.getpid()}"


def make_certificates(folder: Path) -> dict[str, str]:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    files = {"ca": folder / "ca.pem", "cert": folder / "worker.pem", "key": folder / "worker.key"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    server.cert_chain_pems[0].write_to_path(str(files["cert"]))
    server.private_key_pem.write_to_path(str(files["key"]))
    return {name: str(path) for name, path in files.items()}


def start_worker(pki: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    """``wove worker http`` on a free port; returns the process and the URL it printed."""
    worker = subprocess.Popen(
        [sys.executable, "-m", "wove.cli", "worker", "http", "--host", "127.0.0.1", "--port", "0",
         "--certfile", pki["cert"], "--keyfile", pki["key"], "--security", "env:WOVE_SECRET"],
        stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    assert worker.stdout is not None
    line = worker.stdout.readline()  # "listening on https://127.0.0.1:PORT/wove"
    if "listening on " not in line:
        worker.kill()
        raise RuntimeError(f"the worker did not start: {line!r}")
    return worker, line.split("listening on ", 1)[1].strip()


async def main(url: str, ca_file: str) -> None:
    environments = {
        "secure": {"executor": "https", "delivery_timeout": 30,
                   "executor_config": {"url": url, "ca_file": ca_file, "security": "env:WOVE_SECRET"}},
        # the same worker, without the secret: refused before anything is decoded
        "intruder": {"executor": "https", "delivery_timeout": 30,
                     "executor_config": {"url": url, "ca_file": ca_file}},
    }
    async with ExecutorRuntime(environments) as runtime:
        print(await runtime.call("secure", where_am_i, "hello"))
        try:
            await runtime.call("intruder", where_am_i, "let me in")
        except EnvironmentExecutionError as exc:
            print(f"without the secret: {type(exc).__name__}: {str(exc).splitlines()[0]}")
        else:
            raise AssertionError("an unsigned request was accepted")


if __name__ == "__main__":
    # both sides read the secret from the environment, never from the command line
    os.environ["WOVE_SECRET"] = secrets.token_urlsafe(32)
    with tempfile.TemporaryDirectory() as folder:
        pki = make_certificates(Path(folder))
        worker, url = start_worker(pki)
        try:
            asyncio.run(main(url, pki["ca"]))
        finally:
            worker.terminate()  # SIGTERM: the worker drains its runs and exits 0
            worker.wait(timeout=30)
