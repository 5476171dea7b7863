"""executor_config of the rq executor: Wove 2.x's keys, unknown keys and bad values fail at start."""

from __future__ import annotations

from typing import Any

import pytest

from wove.environment import ExecutorRuntime
from wove.errors import ConfigError
from wove_executor_rq import RQ_OPTIONS, rq_job_id


def test_the_wove_2x_keys_and_the_shared_keys_are_known() -> None:
    assert {"queue", "redis_url", "queue_name", "enqueue_options"} <= set(RQ_OPTIONS.options)
    assert {"callback_url", "result_channel", "require_signed_callbacks", "max_deliveries"} <= set(RQ_OPTIONS.options)


@pytest.mark.parametrize(("config", "match"), [
    ({"redis_url": "redis://127.0.0.1:1/3", "queue_nam": "x"},
     r"rq executor: executor_config key 'queue_nam' \(did you mean 'queue_name'\?\) is not an? rq executor option"),
    ({"redis_ur": "redis://127.0.0.1:1/3"}, r"did you mean 'redis_url'\?"),
    ({}, r"needs `redis_url`.*or `queue`"),
    ({"redis_url": 6379}, r"executor_config.redis_url must be a string, got 6379"),
    ({"redis_url": "redis://127.0.0.1:1/3", "enqueue_options": {"job_id": "x"}},
     r"enqueue_options .*may not set 'job_id'.*delivery_idempotency_key"),
    ({"redis_url": "redis://127.0.0.1:1/3", "enqueue_options": {"result_ttl": 0}}, r"result_ttl=0 discards"),
    ({"redis_url": "redis://127.0.0.1:1/3", "queue": "default"}, r"executor_config.queue must be an rq.Queue"),
    ({"redis_url": "redis://127.0.0.1:1/3", "result_channel": "smoke"}, r"result_channel must be one of"),
])
async def test_unknown_keys_and_bad_values_fail_at_start(config: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        async with ExecutorRuntime({"r": {"executor": "rq", "executor_config": config}}, {}):
            pass


async def test_unreachable_redis_names_the_url_without_its_password() -> None:
    config = {"redis_url": "redis://user:secret@127.0.0.1:9/3"}
    with pytest.raises(OSError, match=r"cannot reach Redis for queue 'default' at redis://user:\*\*\*@127\.0\.0\.1:9/3") as info:
        async with ExecutorRuntime({"r": {"executor": "rq", "executor_config": config}}, {}):
            pass
    assert "secret" not in str(info.value)


def test_job_ids_are_the_key_when_rq_accepts_it_else_a_stable_safe_form() -> None:
    assert rq_job_id("report-2024_05") == "report-2024_05"
    run_id = rq_job_id("add:0f3a9c")
    assert run_id.startswith("add_0f3a9c-") and run_id == rq_job_id("add:0f3a9c")
    assert rq_job_id("a:b") != rq_job_id("a_b") and rq_job_id("a:b") != rq_job_id("a/b")
