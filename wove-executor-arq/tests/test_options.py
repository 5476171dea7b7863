"""executor_config of the arq executor: Wove 2.x's keys, unknown keys and bad values fail at start."""

from __future__ import annotations

from typing import Any

import pytest

from wove.environment import ExecutorRuntime
from wove.errors import ConfigError
from wove_executor_arq import ARQ_OPTIONS


def test_the_wove_2x_keys_and_the_shared_keys_are_known() -> None:
    assert {"pool", "redis_settings", "function_name", "enqueue_options", "queue_name"} <= set(ARQ_OPTIONS.options)
    assert {"callback_url", "result_channel", "require_signed_callbacks", "max_deliveries"} <= set(ARQ_OPTIONS.options)


@pytest.mark.parametrize(("config", "match"), [
    ({"redis_settings": "redis://127.0.0.1:1/4", "function": "x"},
     r"arq executor: executor_config key 'function' \(did you mean 'function_name'\?\) is not an? arq executor option"),
    ({"redis_setting": "redis://127.0.0.1:1/4"}, r"did you mean 'redis_settings'\?"),
    ({}, r"needs `redis_settings`.*or `pool`"),
    ({"redis_settings": 6379}, r"executor_config.redis_settings must be an arq RedisSettings, a dict of its fields, "
                               r"or a redis:// URL, got 6379"),
    ({"redis_settings": "http://127.0.0.1:1"}, r"is not a redis:// URL"),
    ({"redis_settings": {"hots": "127.0.0.1"}}, r"redis_settings has a key RedisSettings does not know"),
    ({"redis_settings": "redis://127.0.0.1:1/4", "enqueue_options": {"_job_id": "x"}},
     r"enqueue_options .*may not set '_job_id'.*delivery_idempotency_key"),
    ({"redis_settings": "redis://127.0.0.1:1/4", "pool": "p"}, r"executor_config.pool must be an arq ArqRedis pool"),
    ({"redis_settings": "redis://127.0.0.1:1/4", "poll_interval": 0}, r"poll_interval must be a positive number"),
])
async def test_unknown_keys_and_bad_values_fail_at_start(config: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        async with ExecutorRuntime({"a": {"executor": "arq", "executor_config": config}}, {}):
            pass


async def test_unreachable_redis_names_the_address() -> None:
    with pytest.raises(OSError, match=r"arq executor cannot reach Redis at 127\.0\.0\.1:9 \(database 4\)"):
        async with ExecutorRuntime({"a": {"executor": "arq",
                                          "executor_config": {"redis_settings": "redis://127.0.0.1:9/4"}}}, {}):
            pass
