"""Plugin registration, import weight, configuration errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from wove.backend import BackendAdapterEnvironmentExecutor, get_backend_adapter_class
from wove.environment import build_executor_from_name
from wove_executor_dask import DaskAdapter


def test_plugin_import_does_not_import_dask() -> None:
    code = ("import sys, wove_executor_dask, wove_executor_dask.plugin; "
            "print(sorted(m for m in ('distributed', 'dask', 'uvicorn', 'cloudpickle') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_resolves_by_name_and_adapter_lookup() -> None:
    executor = build_executor_from_name("dask")
    assert isinstance(executor, BackendAdapterEnvironmentExecutor)
    assert get_backend_adapter_class("dask") is DaskAdapter
    # the seed signature: the adapter is found by name
    assert isinstance(BackendAdapterEnvironmentExecutor("dask"), BackendAdapterEnvironmentExecutor)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"n_workers": "2"}, "n_workers must be a non-negative integer"),
        ({"processes": "yes"}, "processes must be true or false"),
        ({"submit_options": {"key": "x"}}, "may not set 'key'"),
        ({"client_options": []}, "client_options must be a dict"),
        ({"address": 8786}, "address must be a string"),
    ],
)
async def test_bad_config_is_rejected_before_starting_anything(config: dict, match: str) -> None:
    executor = BackendAdapterEnvironmentExecutor("dask")
    with pytest.raises(ValueError, match=match):
        await executor.start(environment_name="e", environment_config=config, run_config={})


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_unreachable_scheduler_names_the_address() -> None:
    executor = build_executor_from_name("dask")
    config = {"address": "tcp://127.0.0.1:9", "client_options": {"timeout": "1s"}}
    with pytest.raises(OSError, match=r"tcp://127\.0\.0\.1:9"):
        await executor.start(environment_name="e", environment_config=config, run_config={})


@pytest.mark.timeout(15)
async def test_unreachable_scheduler_fails_within_connect_timeout() -> None:
    address = f"tcp://127.0.0.1:{_closed_port()}"
    executor = build_executor_from_name("dask")
    with pytest.raises(OSError) as info:
        await executor.start(environment_name="e", environment_config={"address": address, "connect_timeout": 0.5},
                             run_config={})
    message = str(info.value)
    assert address in message and "executor_config.connect_timeout=0.5 s" in message


@pytest.mark.timeout(20)  # Dask's own default would be 30 s of silence
async def test_unreachable_scheduler_fails_fast_by_default() -> None:
    from wove_executor_dask import DEFAULT_CONNECT_TIMEOUT

    address = f"tcp://127.0.0.1:{_closed_port()}"
    executor = build_executor_from_name("dask")
    with pytest.raises(OSError, match=f"connect_timeout={DEFAULT_CONNECT_TIMEOUT:g} s") as info:
        await executor.start(environment_name="e", environment_config={"address": address}, run_config={})
    assert address in str(info.value)


@pytest.mark.parametrize("value", [0, -1, "5s", True])
async def test_bad_connect_timeout_is_rejected(value: object) -> None:
    executor = build_executor_from_name("dask")
    with pytest.raises(ValueError, match="connect_timeout"):
        await executor.start(environment_name="e", environment_config={"connect_timeout": value}, run_config={})


async def test_demo_environment() -> None:
    from wove_executor_dask.plugin import wove_demo_environments

    found = {}
    wove_demo_environments(lambda name, factory: found.setdefault(name, factory))
    async with found["dask"]() as definition:
        assert definition["executor"] == "dask"
