"""wove.options: one executor_config validator; the local executor's keys through the runtime."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

from wove.environment import ExecutorRuntime, LocalEnvironmentExecutor
from wove.errors import ConfigError
from wove.options import (
    BOOL,
    POSITIVE_INT,
    POSITIVE_SECONDS,
    REDELIVERY_OPTIONS,
    STR,
    STR_MAP,
    Kind,
    Option,
    OptionSpec,
    one_of,
)


def _shout(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"give text, not {type(value).__name__}")
    return value.upper()


SPEC = OptionSpec("demo", [
    Option("target", STR, doc="host:port", required=True),
    Option("processes", POSITIVE_INT, 1, "pool size"),
    Option("timeout", POSITIVE_SECONDS, 30.0),
    Option("mode", one_of("fast", "safe"), "fast"),
    Option("tls", BOOL, False, aliases=("secure",)),
    Option("env", STR_MAP),
    Option("upper", Kind("a string", _shout)),
    REDELIVERY_OPTIONS,
])


def test_defaults_fill_every_key_and_aliases_land_on_the_current_name() -> None:
    values = SPEC.validate({"target": "h:1", "secure": True, "ready_timeout": 3, "upper": "abc"}, environment="e")
    assert values["target"] == "h:1" and values["processes"] == 1 and values["mode"] == "fast"
    assert values["tls"] is True and "secure" not in values
    assert values["reconnect_timeout"] == 3 and values["upper"] == "ABC"
    assert set(values) == set(SPEC.options)
    assert SPEC.validate({"target": "h:1", "processes": None})["processes"] == 1  # None: not set


@pytest.mark.parametrize(("config", "message"), [
    ({"target": "h", "process": 4},
     r"^Environment 'e': executor_config key 'process' \(did you mean 'processes'\?\) is not a demo executor "
     r"option\. Known keys: env, max_deliveries, mode, processes, "),
    ({"target": "h", "secur": True}, r"'secur' \(did you mean 'secure', an older spelling of 'tls'\?\)"),
    ({"target": "h", "zzz": 1, "timout": 2},
     r"keys 'zzz', 'timout' \(did you mean 'timeout'\?\) are not demo executor options"),
    ({"target": "h", "processes": 0}, r"^Environment 'e': executor_config\.processes must be a positive integer, got 0\.$"),
    ({"target": "h", "processes": True}, r"processes must be a positive integer, got True"),
    ({"target": "h", "timeout": float("nan")}, r"timeout must be a positive number of seconds, got nan"),
    ({"target": "h", "mode": "quick"}, r"mode must be one of 'fast', 'safe', got 'quick'"),
    ({"target": "h", "env": {"A": 1}}, r"env must be a dict of strings to strings, got \{'A': 1\}; 'A' maps to int 1"),
    ({"target": "h", "upper": 5}, r"upper must be a string, got 5; give text, not int\.$"),
    ({"target": "h", "tls": True, "secure": False}, r"sets both 'tls' and its older spelling 'secure'; keep only 'tls'"),
    ({"target": "h", "max_deliveries": 0}, r"max_deliveries must be a positive integer, got 0"),
    ({}, r"executor_config\.target is required by the demo executor \(host:port\) and is not set"),
])
def test_errors_name_the_key_the_value_and_the_fix(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SPEC.validate(config, environment="e")


def test_without_an_environment_the_executor_is_named_and_non_dicts_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"^demo executor: executor_config\.target is required"):
        SPEC.validate(None)
    with pytest.raises(ConfigError, match=r"executor_config must be a table/dict of demo options, got list"):
        SPEC.validate(["target"])  # type: ignore[arg-type]


def test_specs_compose_and_describe_themselves() -> None:
    derived = SPEC.extend("demo2", [Option("processes", POSITIVE_INT, 4, "bigger pool")])
    assert derived.validate({"target": "h"})["processes"] == 4
    assert "secure" in derived and "processes" in derived and "nope" not in derived
    table = derived.describe()
    assert "| `tls` (older: `secure`) | true or false | `False` |" in table
    assert "| `target` | a string | required | host:port |" in table
    with pytest.raises(ValueError, match="alias 'processes' of 'workers' is already a key"):
        OptionSpec("bad", [Option("processes"), Option("workers", aliases=("processes",))])


# -- the local executor, started for real ------------------------------------------------------
@pytest.mark.parametrize(("config", "message"), [
    ({"max_wrkers": 4}, r"Environment 'a': executor_config key 'max_wrkers' \(did you mean 'max_workers'\?\) is "
                        r"not a local executor option\. Known keys: max_concurrency, max_workers\."),
    ({"max_concurency": 4}, r"did you mean 'max_concurrency'\?"),
    ({"max_workers": 0}, r"executor_config\.max_workers must be a positive integer, got 0\."),
])
async def test_local_executor_rejects_misspelt_keys_at_start(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        async with ExecutorRuntime({"a": {"executor": "local", "executor_config": config}}, {}):
            pass
    executor = LocalEnvironmentExecutor()
    with pytest.raises(ConfigError, match=message.replace("'a'", "'direct'")):
        await executor.start(environment_name="direct", environment_config=config, run_config={})


async def test_local_executor_declares_its_options_and_takes_max_workers_from_the_definition() -> None:
    spec = LocalEnvironmentExecutor.config_options
    assert spec is not None and set(spec.options) == {"max_workers", "max_concurrency"}
    async with ExecutorRuntime({"a": {"executor": "local", "max_workers": 2,
                                      "executor_config": {"max_concurrency": 8}}}, {}) as runtime:
        assert await runtime.call("a", sum, [1, 2, 3]) == 6


# -- network executors -----------------------------------------------------------------------
needs_grpc = pytest.mark.skipif(importlib.util.find_spec("wove_executor_grpc") is None,
                                reason="wove-executor-grpc is not installed")


@needs_grpc
async def test_max_workers_on_grpc_is_rejected_before_it_starts() -> None:
    definition = {"executor": "grpc", "max_workers": 8, "executor_config": {"target": "127.0.0.1:1"}}
    with pytest.raises(ConfigError, match=r"Environment 'g': max_workers = 8 sizes the thread pool of the local "
                                          r"executor; the grpc executor has no such setting\. Remove max_workers"):
        async with ExecutorRuntime({"g": definition}, {}):
            pass


@needs_grpc
async def test_grpc_rejects_a_misspelt_key_with_did_you_mean() -> None:
    definition = {"executor": "grpc", "executor_config": {"target": "127.0.0.1:1", "tiemout": 5}}
    with pytest.raises(ConfigError, match=r"executor_config key 'tiemout' \(did you mean 'timeout'\?\)"):
        async with ExecutorRuntime({"g": definition}, {}):
            pass
