"""The http executor speaks the one TLS vocabulary (wove.tls) and validates through wove.options.

The same TLS dict as the grpc and websocket packages' tests of this name, against a real
``wove worker http --certfile --keyfile`` whose certificate (from a trustme CA) names only
``worker.test``: the executor reaches 127.0.0.1 and checks the certificate against
``server_hostname``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from wove.errors import ConfigError, EnvironmentExecutionError
from wove.runtime import ExecutorRuntime
from wove.testing import WorkerProcess, tasks
from wove_executor_http import HttpEnvironmentExecutor

pytest.importorskip("trustme")  # the root conftest's pki fixture issues the certificates


def tls_config(pki: dict[str, str]) -> dict[str, Any]:
    """The TLS keys, identical for http, grpc and websocket."""
    return {"tls": True, "ca_file": pki["ca"], "server_hostname": "worker.test"}


@pytest.fixture(scope="module")
def tls_worker(pki: dict[str, str]) -> Iterator[str]:
    """A worker that requires a client certificate from the CA (--ca-certs)."""
    worker = WorkerProcess("http", "--certfile", pki["cert"], "--keyfile", pki["key"], "--ca-certs", pki["ca"])
    url = worker.start(0)
    yield url
    worker.stop()


def runtime_for(url: str, **config: Any) -> ExecutorRuntime:
    return ExecutorRuntime({"w": {"executor": "http", "executor_config": {"url": url, **config}}}, {})


@pytest.mark.parametrize("transport", ["native", "aiohttp", "httpx"])
async def test_the_shared_tls_keys_reach_a_real_tls_worker(tls_worker: str, pki: dict[str, str],
                                                           transport: str) -> None:
    mutual = {**tls_config(pki), "cert_file": pki["client_cert"], "key_file": pki["client_key"],
              "transport": transport}
    async with runtime_for(tls_worker, **mutual) as runtime:
        assert await runtime.call("w", tasks.add, 20, 22) == 42
    # the certificate names worker.test, not 127.0.0.1: without server_hostname it is refused
    without_name = {key: value for key, value in mutual.items() if key != "server_hostname"}
    async with runtime_for(tls_worker, **without_name) as runtime:
        with pytest.raises(EnvironmentExecutionError) as info:
            await runtime.call("w", tasks.add, 1, 1)
    assert info.value.payload["kind"] == "TLSVerifyFailed", info.value.payload
    assert "executor_config.server_hostname" in str(info.value)


async def test_the_older_http_spellings_still_work(tls_worker: str, pki: dict[str, str]) -> None:
    older = {"verify": pki["ca"], "cert": [pki["client_cert"], pki["client_key"]], "server_hostname": "worker.test"}
    async with runtime_for(tls_worker, **older) as runtime:
        assert await runtime.call("w", tasks.add, 1, 2) == 3


async def test_without_a_client_certificate_the_worker_refuses(tls_worker: str, pki: dict[str, str]) -> None:
    async with runtime_for(tls_worker, **tls_config(pki)) as runtime:
        with pytest.raises(EnvironmentExecutionError) as info:
            await runtime.call("w", tasks.add, 1, 1)
    assert info.value.payload["source"] == "transport" and tls_worker in str(info.value)


@pytest.mark.parametrize(("config", "message"), [
    ({"conect_timeout": 5}, r"^Environment 'e': executor_config key 'conect_timeout' \(did you mean "
                            r"'connect_timeout'\?\) is not a http executor option\. Known keys: binary_frames, ca_file, cert_file, "),
    ({"max_workers": 4}, r"key 'max_workers' is not a http executor option"),
    ({"root_certificate": "x"}, r"'root_certificate' \(did you mean 'root_certificates', an older spelling of 'ca_file'\?\)"),
    ({"tls": True}, r"tls is True but the URL scheme says TLS is off; the URL decides: use a https:// or wss:// URL"),
    ({"stream": "sometimes"}, r"executor_config\.stream must be one of 'auto', True, False, got 'sometimes'"),
])
async def test_bad_keys_fail_at_start(config: dict[str, Any], message: str) -> None:
    executor = HttpEnvironmentExecutor()
    with pytest.raises(ConfigError, match=message):
        await executor.start(environment_name="e", run_config={},
                             environment_config={"url": "http://127.0.0.1:1/wove", **config})
    assert HttpEnvironmentExecutor.config_options is not None and "ca_file" in HttpEnvironmentExecutor.config_options


async def test_the_https_executor_names_itself(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"key 'urll' \(did you mean 'url'\?\) is not a https executor option"):
        await HttpEnvironmentExecutor(require_https=True).start(
            environment_name="e", run_config={}, environment_config={"urll": "https://127.0.0.1:1/wove"})
