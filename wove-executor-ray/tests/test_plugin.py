"""Plugin registration, import weight, executor_config validation (no Ray cluster needed)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from wove.backend import BackendAdapterEnvironmentExecutor, get_backend_adapter_class
from wove.environment import ExecutorRuntime, build_executor_from_name
from wove.errors import ConfigError
from wove_executor_ray import RAY_OPTIONS, RayAdapter


def test_plugin_import_does_not_import_ray() -> None:
    code = ("import sys, wove_executor_ray, wove_executor_ray.plugin; "
            "print(sorted(m for m in ('ray', 'uvicorn', 'cloudpickle') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_resolves_by_name_and_adapter_lookup() -> None:
    executor = build_executor_from_name("ray")
    assert isinstance(executor, BackendAdapterEnvironmentExecutor)
    assert get_backend_adapter_class("ray") is RayAdapter
    assert isinstance(BackendAdapterEnvironmentExecutor("ray"), BackendAdapterEnvironmentExecutor)


def test_the_wove2_keys_and_the_shared_keys_are_known() -> None:
    wove2 = {"address", "init", "init_options", "remote_options", "force_cancel"}
    shared = {"callback_host", "callback_url", "require_signed_callbacks", "result_channel", "max_deliveries"}
    assert wove2 | shared | {"connect_timeout", "idempotency_ttl"} <= set(RAY_OPTIONS.options)


@pytest.mark.parametrize(("config", "match"), [
    ({"adress": "127.0.0.1:6379"}, r"ray executor: executor_config key 'adress' \(did you mean 'address'\?\) "
                                   r"is not a ray executor option\. Known keys: .*address"),
    ({"force_cancle": True}, r"did you mean 'force_cancel'\?"),
    ({"force_cancel": "yes"}, r"force_cancel must be true or false, got 'yes'"),
    ({"init": 1}, r"init must be true or false"),
    ({"address": 6379}, r"address must be a string"),
    ({"init_options": ["num_cpus", 2]}, r"init_options must be a dict"),
    ({"remote_options": {"max_retries": 3}}, r"remote_options must be a dict of Ray task options, got "
                                             r"\{'max_retries': 3\}; it may not set 'max_retries': Wove sets "
                                             r"max_retries=0 so that delivery_orphan_policy decides"),
    ({"remote_options": {"num_returns": 2}}, r"may not set 'num_returns'"),
    ({"connect_timeout": 0}, r"connect_timeout must be a positive number of seconds"),
    ({"result_channel": "ray"}, r"result_channel must be one of"),
])
async def test_bad_config_fails_at_start_before_connecting(config: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        async with ExecutorRuntime({"r": {"executor": "ray", "executor_config": config}}, {}):
            pass
    assert "while starting environment 'r'" in "".join(getattr(info.value, "__notes__", []))


async def test_max_workers_is_not_a_ray_setting() -> None:
    with pytest.raises(ConfigError, match=r"max_workers = 8 sizes the thread pool of the local executor; the ray "
                                          r"executor has no such setting"):
        async with ExecutorRuntime({"r": {"executor": "ray", "max_workers": 8}}, {}):
            pass
