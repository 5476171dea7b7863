"""GrpcEnvironmentExecutor without a server: config validation, lazy import, exports."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

import wove_executor_grpc
from wove.environment import build_executor_from_name
from wove_executor_grpc import GrpcEnvironmentExecutor


async def start(config: dict[str, Any]) -> GrpcEnvironmentExecutor:
    executor = GrpcEnvironmentExecutor()
    await executor.start(environment_name="env", environment_config=config, run_config={})
    return executor


def test_exports_are_complete_and_sorted() -> None:
    exported = vars(wove_executor_grpc)["__all__"]
    assert exported == sorted(exported) == ["GrpcEnvironmentExecutor"]


def test_resolves_by_name_and_seed_import() -> None:
    from wove.environment import GrpcEnvironmentExecutor as Seed

    assert Seed is GrpcEnvironmentExecutor
    assert isinstance(build_executor_from_name("grpc"), GrpcEnvironmentExecutor)


def test_importing_the_plugin_does_not_import_grpc() -> None:
    code = "import sys, wove_executor_grpc.plugin; print('grpc' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr


async def test_missing_grpcio_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "grpc", None)
    with pytest.raises(ImportError, match="pip install wove-executor-grpc"):
        await start({"target": "127.0.0.1:1"})


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({}, "executor_config.target"),
        ({"target": "127.0.0.1:1", "method": "Send"}, "executor_config.method"),
        ({"target": "127.0.0.1:1", "streaming": "sometimes"}, "executor_config.streaming"),
        ({"target": "127.0.0.1:1", "timeout": -1}, "executor_config.timeout"),
        ({"target": "127.0.0.1:1", "tagret": "x"}, r"key 'tagret' \(did you mean 'target'\?\) is not a grpc executor option"),
        ({"target": "127.0.0.1:1", "max_deliveries": 0}, "max_deliveries"),
        ({"target": "127.0.0.1:1", "certificate_chain": b"x"}, "private_key"),
        ({"target": "127.0.0.1:1", "root_certificates": "/no/such/ca.pem"}, "root_certificates"),
        ({"target": "127.0.0.1:1", "root_certificates": b"pem", "secure": False}, "secure"),
    ],
)
async def test_bad_config_is_refused_at_start(config: dict[str, Any], match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        await start(config)


async def test_non_local_target_needs_tls_and_security() -> None:
    with pytest.raises(ValueError, match="without TLS"):
        await start({"target": "workers.example.org:50051"})
    with pytest.raises(ValueError, match="without authentication"):
        await start({"target": "workers.example.org:50051", "secure": True})
    executor = await start({"target": "workers.example.org:50051", "insecure": True})
    await executor.stop()


async def test_security_env_variable_must_be_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WOVE_GRPC_MISSING", raising=False)
    with pytest.raises(RuntimeError, match="WOVE_GRPC_MISSING"):
        await start({"target": "127.0.0.1:1", "security": "env:WOVE_GRPC_MISSING"})


async def test_unknown_frame_type_and_unpicklable_args() -> None:
    executor = await start({"target": "127.0.0.1:1"})
    try:
        with pytest.raises(ValueError, match="launch"):
            await executor.send({"type": "launch", "run_id": "x:1", "task_id": "x"})
        with pytest.raises(TypeError):  # DispatchError names the task and path
            await executor.send({"type": "run_task", "run_id": "t:1", "task_id": "t", "callable": print,
                                 "args": {"lock": __import__("threading").Lock()}, "delivery": {}})
    finally:
        await executor.stop()


async def test_channel_options_have_large_message_defaults() -> None:
    from wove_executor_grpc.executor import GRPC_OPTIONS

    config = GRPC_OPTIONS.validate({"target": "127.0.0.1:1", "options": {"grpc.keepalive_time_ms": 5000}})
    options = dict(config["options"])
    assert options["grpc.max_receive_message_length"] >= 64 * 1024 * 1024
    assert options["grpc.max_send_message_length"] >= 64 * 1024 * 1024
    assert options["grpc.keepalive_time_ms"] == 5000
