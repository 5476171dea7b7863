"""The websocket executor resolves by name (and alias) and passes the core contract kit."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from wove.registry import build_executor_from_name
from wove.runtime import ExecutorRuntime
from wove.testing import ExecutorContract
from wove_executor_ws import WebSocketEnvironmentExecutor, plugin


class TestWebSocketContract(ExecutorContract):
    expect_streaming = True  # the worker's handshake answer announces task_yield

    @pytest.fixture
    def executor_name(self) -> str:
        return "websocket"

    @pytest.fixture
    def executor_config(self, shared_worker: Any) -> dict[str, Any]:
        return {"url": shared_worker.url}


def test_alias_and_seed_name() -> None:
    assert isinstance(build_executor_from_name("websocket"), WebSocketEnvironmentExecutor)
    assert isinstance(build_executor_from_name("ws"), WebSocketEnvironmentExecutor)
    from wove.environment import WebSocketEnvironmentExecutor as FromSeed

    assert FromSeed is WebSocketEnvironmentExecutor


def test_plugin_module_is_light() -> None:
    registered: dict[str, Any] = {}
    plugin.wove_register_executors(lambda name, factory, **kw: registered.setdefault(name, (factory, kw)))
    assert registered["websocket"][0] is WebSocketEnvironmentExecutor
    assert registered["websocket"][1]["aliases"] == ("ws",)
    code = "import sys, wove_executor_ws.plugin; print('websockets' in sys.modules)"
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "False", out.stderr


async def test_demo_environment() -> None:
    demos: dict[str, Any] = {}
    plugin.wove_demo_environments(lambda name, factory: demos.setdefault(name, factory))
    async with demos["websocket"]() as definition:
        assert definition["executor"] == "websocket"
        assert definition["executor_config"]["url"].startswith("ws://127.0.0.1:")
        async with ExecutorRuntime({"demo": definition}, {}) as runtime:
            assert await runtime.call("demo", pow, 2, 10) == 1024


def test_worker_service_registered() -> None:
    import argparse

    services: dict[str, Any] = {}
    plugin.wove_worker_services(lambda name, add, run, help="": services.setdefault(name, (add, run)))
    parser = argparse.ArgumentParser()
    services["websocket"][0](parser)
    args = parser.parse_args([])
    assert args.path == "/wove" and args.certfile is None and args.keyfile is None
