"""The ``http`` executor resolves by name and passes the contract kit against a real service."""

from __future__ import annotations

from typing import Any

import pytest

from wove.environment import build_executor_from_name
from wove.testing import ExecutorContract
from wove_executor_http import HttpEnvironmentExecutor

pytestmark = pytest.mark.integration


class TestHttpContract(ExecutorContract):
    expect_streaming = True  # every answer carries X-Wove-Capabilities; streamed runs get NDJSON

    @pytest.fixture
    def executor_name(self) -> str:
        return "http"

    @pytest.fixture
    def executor_config(self, worker: Any) -> dict[str, Any]:
        return {"url": worker.url}


class TestHttpSignedContract(ExecutorContract):
    expect_streaming = True  # every answer carries X-Wove-Capabilities; streamed runs get NDJSON

    @pytest.fixture
    def executor_name(self) -> str:
        return "http"

    @pytest.fixture
    def executor_config(self, signed_worker: Any, secret_env: str) -> dict[str, Any]:
        return {"url": signed_worker.url, "security": f"env:{secret_env}"}


def test_https_name_builds_a_https_only_executor() -> None:
    executor = build_executor_from_name("https")
    assert isinstance(executor, HttpEnvironmentExecutor)
    assert executor.executor_name == "https"
    assert build_executor_from_name("https") is not executor


def test_plugin_module_imports_no_transport_library() -> None:
    import subprocess
    import sys

    code = ("import sys, wove_executor_http.plugin; "
            "bad = [m for m in ('httpx', 'aiohttp', 'uvicorn', 'httpx_aiohttp') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
