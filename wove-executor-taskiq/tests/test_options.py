"""executor_config of the taskiq executor: Wove 2.x's keys, unknown keys and bad values fail at start."""

from __future__ import annotations

from typing import Any

import pytest

from wove.environment import ExecutorRuntime
from wove.errors import ConfigError
from wove_executor_taskiq import TASKIQ_OPTIONS, load_object


def test_the_wove_2x_keys_and_the_shared_keys_are_known() -> None:
    assert {"task", "broker", "task_name"} <= set(TASKIQ_OPTIONS.options)
    assert {"callback_url", "result_channel", "require_signed_callbacks", "max_deliveries"} <= set(
        TASKIQ_OPTIONS.options)


@pytest.mark.parametrize(("config", "match"), [
    ({"broker": "json:loads", "task_nam": "x"},
     r"taskiq executor: executor_config key 'task_nam' \(did you mean 'task_name'\?\) is not a taskiq executor option"),
    ({"broker": "json:loads", "brokr": "x"}, r"key 'brokr' \(did you mean 'broker'\?\)"),
    ({}, r"needs `broker`.*or `task`"),
    ({"broker": 5}, r"executor_config.broker must be a taskiq broker or 'module:attribute' naming one, got 5"),
    ({"broker": "no_such_module_here:broker"}, r"module 'no_such_module_here' cannot be imported"),
    ({"broker": "json"}, r"is not of the form 'package.module:attribute'"),
    ({"task": "json:nothing"}, r"'json' has no attribute 'nothing'"),
])
async def test_unknown_keys_and_bad_values_fail_at_start(config: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        async with ExecutorRuntime({"t": {"executor": "taskiq", "executor_config": config}}, {}):
            pass


async def test_a_broker_without_a_result_backend_is_refused() -> None:
    from taskiq_redis import ListQueueBroker

    broker = ListQueueBroker("redis://127.0.0.1:9/5")  # no with_result_backend(...): nothing connects
    with pytest.raises(ConfigError, match=r"the broker has no result backend"):
        async with ExecutorRuntime({"t": {"executor": "taskiq", "executor_config": {"broker": broker}}}, {}):
            pass


def test_load_object_reads_module_colon_attribute() -> None:
    import json

    assert load_object("json:loads") is json.loads
    assert load_object("os.path:join.__name__") == "join"
