"""The re-delivery policy every transport shares (wove.transport.RedeliveryPolicy)."""

from __future__ import annotations

from typing import Any

import pytest

from wove.transport import REDELIVERY_ALIASES, REDELIVERY_CONFIG_KEYS, RedeliveryPolicy


def test_defaults_are_the_documented_ones() -> None:
    policy = RedeliveryPolicy.from_config({})
    assert (policy.max_deliveries, policy.reconnect_timeout, policy.initial_delay, policy.max_delay) == (3, 30.0, 0.1, 5.0)
    keys = {"max_deliveries", "reconnect_timeout", "reconnect_initial_delay", "reconnect_max_delay"}
    assert set(REDELIVERY_CONFIG_KEYS) == keys


def test_back_off_doubles_with_jitter_up_to_the_cap() -> None:
    policy = RedeliveryPolicy.from_config({"reconnect_initial_delay": 0.2, "reconnect_max_delay": 1.0})
    for attempt, base in ((1, 0.2), (2, 0.4), (3, 0.8), (4, 1.0), (30, 1.0)):
        delays = [policy.delay(attempt) for _ in range(200)]
        assert all(base * 0.5 <= d <= base for d in delays), (attempt, min(delays), max(delays))
        assert len(set(delays)) > 1, "jittered"
    assert RedeliveryPolicy.from_config({"reconnect_initial_delay": 0}).delay(1) > 0, "never a busy loop"


def test_older_names_are_aliases() -> None:
    assert REDELIVERY_ALIASES == {"retry_backoff": "reconnect_initial_delay", "ready_timeout": "reconnect_timeout"}
    policy = RedeliveryPolicy.from_config({"retry_backoff": 0.5, "ready_timeout": 2})
    assert (policy.initial_delay, policy.reconnect_timeout) == (0.5, 2.0)


@pytest.mark.parametrize(("config", "error"), [
    ({"max_deliveries": 0}, "max_deliveries must be a positive integer, got 0"),
    ({"max_deliveries": True}, "max_deliveries must be a positive integer"),
    ({"reconnect_timeout": float("nan")}, "reconnect_timeout must be a non-negative number of seconds, got nan"),
    ({"ready_timeout": -1}, "ready_timeout must be a non-negative number"),
    ({"reconnect_max_delay": "5"}, "reconnect_max_delay must be a non-negative number"),
    ({"ready_timeout": 1, "reconnect_timeout": 2}, "both reconnect_timeout and its older alias ready_timeout"),
])
def test_bad_values_name_the_key_and_the_value(config: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        RedeliveryPolicy.from_config(config, "Environment 'e'")
