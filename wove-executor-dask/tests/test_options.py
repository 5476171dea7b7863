"""executor_config of the dask executor: unknown keys fail at start with a did-you-mean."""

from __future__ import annotations

from typing import Any

import pytest

from wove.environment import ExecutorRuntime, build_executor_from_name
from wove.errors import ConfigError
from wove_executor_dask import DASK_OPTIONS


@pytest.mark.parametrize(("config", "match"), [
    ({"n_worker": 2, "processes": False}, r"dask executor: executor_config key 'n_worker' \(did you mean 'n_workers'\?\) "
                                          r"is not a dask executor option\. Known keys: .*n_workers"),
    ({"adress": "tcp://127.0.0.1:1"}, r"did you mean 'address'\?"),
    ({"callback_hots": "127.0.0.1"}, r"did you mean 'callback_host'\?"),
    ({"submit_options": {"pure": True}}, r"submit_options must be a dict of client.submit keyword arguments, "
                                         r"got \{'pure': True\}; it may not set 'pure'"),
])
async def test_unknown_keys_and_bad_values_fail_at_start(config: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        async with ExecutorRuntime({"d": {"executor": "dask", "executor_config": config}}, {}):
            pass
    assert "while starting environment 'd'" in "".join(getattr(info.value, "__notes__", []))


async def test_the_shared_keys_are_known_and_a_valid_config_starts() -> None:
    assert {"callback_host", "max_deliveries", "reconnect_timeout", "n_workers", "client"} <= set(DASK_OPTIONS.options)
    executor = build_executor_from_name("dask")
    config = {"n_workers": 1, "threads_per_worker": 1, "processes": False, "callback_host": "127.0.0.1",
              "max_deliveries": 2}
    async with ExecutorRuntime({"d": {"executor": executor, "executor_config": config}}, {}) as runtime:
        assert await runtime.call("d", pow, 2, 5) == 32


async def test_max_workers_is_not_a_dask_setting() -> None:
    with pytest.raises(ConfigError, match=r"max_workers = 8 sizes the thread pool of the local executor; the dask "
                                          r"executor has no such setting"):
        async with ExecutorRuntime({"d": {"executor": "dask", "max_workers": 8}}, {}):
            pass
