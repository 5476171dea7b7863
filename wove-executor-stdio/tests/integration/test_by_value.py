"""Functions pickled by value behave on a worker as a fresh unpickle would (every Python)."""

from __future__ import annotations

from typing import Any

import pytest

from wove.environment import ExecutorRuntime

pytestmark = pytest.mark.integration

SOURCE = '''
COUNTER = 0

def bump():
    global COUNTER
    COUNTER += 1
    return COUNTER

def read_scale(x):
    return x * SCALE

SCALE = 3
'''


def _by_value_functions() -> dict[str, Any]:
    """Functions of a module that is not importable anywhere, so cloudpickle sends them by value."""
    namespace: dict[str, Any] = {"__name__": "wove_tests_not_importable"}
    exec(compile(SOURCE, "<by-value>", "exec"), namespace)
    return namespace


async def test_a_function_that_assigns_a_global_starts_fresh_every_run() -> None:
    functions = _by_value_functions()
    environments = {"w": {"executor": "stdio", "executor_config": {"processes": 1}}}
    async with ExecutorRuntime(environments, {}) as runtime:
        # each run unpickles its own copy of the module globals: state never leaks between runs
        assert [await runtime.call("w", functions["bump"]) for _ in range(3)] == [1, 1, 1]
        assert [await runtime.call("w", functions["read_scale"], 2) for _ in range(3)] == [6, 6, 6]
