"""The grpc executor speaks the one TLS vocabulary (wove.tls) and validates through wove.options.

The same TLS dict as the http and websocket packages' tests of this name, against a real
``wove worker grpc --certfile --keyfile --client-ca`` whose certificate (from a trustme CA)
names only ``worker.test``: the executor reaches 127.0.0.1 and checks the certificate
against ``server_hostname`` (gRPC's ``ssl_target_name_override``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from wove.errors import ConfigError, EnvironmentExecutionError
from wove.runtime import ExecutorRuntime
from wove.testing import WorkerProcess, tasks
from wove_executor_grpc import GrpcEnvironmentExecutor

pytest.importorskip("trustme")  # the root conftest's pki fixture issues the certificates


def tls_config(pki: dict[str, str]) -> dict[str, Any]:
    """The TLS keys, identical for http, grpc and websocket."""
    return {"tls": True, "ca_file": pki["ca"], "server_hostname": "worker.test"}


@pytest.fixture(scope="module")
def tls_worker(pki: dict[str, str]) -> Iterator[str]:
    """A worker that requires a client certificate from the CA (--client-ca)."""
    worker = WorkerProcess("grpc", "--certfile", pki["cert"], "--keyfile", pki["key"], "--client-ca", pki["ca"])
    target = worker.start(0)
    yield target
    worker.stop()


def runtime_for(target: str, **config: Any) -> ExecutorRuntime:
    return ExecutorRuntime({"g": {"executor": "grpc", "executor_config": {"target": target, **config}}}, {})


@pytest.mark.parametrize("streaming", ["auto", False])
async def test_the_shared_tls_keys_reach_a_real_tls_worker(tls_worker: str, pki: dict[str, str],
                                                           streaming: Any) -> None:
    mutual = {**tls_config(pki), "cert_file": pki["client_cert"], "key_file": pki["client_key"],
              "streaming": streaming}
    async with runtime_for(tls_worker, **mutual) as runtime:
        assert await runtime.call("g", tasks.add, 20, 22) == 42


async def test_without_server_hostname_the_certificate_does_not_name_the_target(
        tls_worker: str, pki: dict[str, str]) -> None:
    config = {"ca_file": pki["ca"], "cert_file": pki["client_cert"], "key_file": pki["client_key"],
              "streaming": False, "reconnect_timeout": 0}
    async with runtime_for(tls_worker, **config) as runtime:
        with pytest.raises(EnvironmentExecutionError) as info:
            await runtime.call("g", tasks.add, 1, 1)
    assert "UNAVAILABLE" in str(info.value) and info.value.payload["source"] == "transport", str(info.value)
    assert "server_hostname" in str(info.value), str(info.value)


async def test_the_older_grpc_spellings_still_work(tls_worker: str, pki: dict[str, str]) -> None:
    ca = Path(pki["ca"]).read_bytes()  # PEM bytes, as grpc's own API takes them
    older = {"secure": True, "root_certificates": ca, "certificate_chain": pki["client_cert"],
             "private_key": pki["client_key"], "server_hostname": "worker.test"}
    async with runtime_for(tls_worker, **older) as runtime:
        assert await runtime.call("g", tasks.add, 1, 2) == 3


@pytest.mark.parametrize(("config", "message"), [
    ({"tiemout": 5}, r"^Environment 'e': executor_config key 'tiemout' \(did you mean 'timeout'\?\) is not a grpc "
                     r"executor option\. Known keys: binary_frames, ca_file, cert_file, "),
    ({"max_workers": 8}, r"key 'max_workers' is not a grpc executor option"),
    ({"privat_key": "k"}, r"'privat_key' \(did you mean 'private_key', an older spelling of 'key_file'\?\)"),
    ({"tls": True, "verify": False}, r"verify=false is not possible on gRPC"),
    ({"tls": False, "server_hostname": "w"}, r"sets server_hostname but TLS is off; set tls=true"),
    ({"method": "Send"}, r"executor_config\.method must be a full gRPC method path"),
])
async def test_bad_keys_fail_at_start(config: dict[str, Any], message: str) -> None:
    executor = GrpcEnvironmentExecutor()
    with pytest.raises(ConfigError, match=message):
        await executor.start(environment_name="e", run_config={},
                             environment_config={"target": "127.0.0.1:1", **config})
    assert GrpcEnvironmentExecutor.config_options is not None and "ca_file" in GrpcEnvironmentExecutor.config_options


async def test_the_secure_target_rule_reads_the_tls_key() -> None:
    remote = {"target": "workers.example.org:50051", "security": {"type": "bearer", "token": "t"}}
    executor = GrpcEnvironmentExecutor()
    with pytest.raises(ValueError, match=r"without TLS\. Non-loopback targets need TLS \(executor_config\.tls=true\)"):
        await executor.start(environment_name="e", run_config={}, environment_config=remote)
    for tls in ({"tls": True}, {"secure": True}):  # the channel is lazy: nothing is dialled here
        await executor.start(environment_name="e", run_config={}, environment_config={**remote, **tls})
        await executor.stop()
