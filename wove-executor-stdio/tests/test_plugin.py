"""The stdio executor resolves by name and passes the core contract kit."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from wove.environment import StdioEnvironmentExecutor as FromSeed
from wove.registry import build_executor_from_name
from wove.testing import ExecutorContract
from wove_executor_stdio import StdioEnvironmentExecutor, plugin


class TestStdioContract(ExecutorContract):
    expect_streaming = True  # the worker's ready line announces task_yield

    @pytest.fixture
    def executor_name(self) -> str:
        return "stdio"


class TestStdioPoolContract(ExecutorContract):
    """The same contract with two worker processes."""

    expect_streaming = True

    @pytest.fixture
    def executor_name(self) -> str:
        return "stdio"

    @pytest.fixture
    def executor_config(self) -> dict[str, Any]:
        return {"processes": 2}


def test_registered_class_and_seed_name() -> None:
    assert isinstance(build_executor_from_name("stdio"), StdioEnvironmentExecutor)
    assert FromSeed is StdioEnvironmentExecutor


def test_plugin_module_is_light() -> None:
    code = (
        "import sys, wove_executor_stdio.plugin as p; registered = {}; "
        "p.wove_register_executors(lambda name, factory, **kw: registered.setdefault(name, factory)); "
        "assert list(registered) == ['stdio'], registered; "
        "assert 'cloudpickle' not in sys.modules, 'registering the plugin imported cloudpickle'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


async def test_demo_environment() -> None:
    demos: dict[str, Any] = {}
    plugin.wove_demo_environments(lambda name, factory: demos.setdefault(name, factory))
    async with demos["stdio"]() as definition:
        assert definition == {"executor": "stdio", "executor_config": {"processes": 2}}
