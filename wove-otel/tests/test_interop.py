"""A Wove 2.x peer ignores the trace fields: an instrumented caller's runs still work there."""

from __future__ import annotations

from pathlib import Path

import pytest

from wove.environment import ExecutorRuntime
from wove_otel import names

from .conftest import Telemetry

pytestmark = [pytest.mark.integration, pytest.mark.interop]


async def test_a_wove2_stdio_worker_runs_tasks_sent_with_a_traceparent(wove2_python: Path, otel: Telemetry) -> None:
    # defined here so they travel by value (wove-core is not importable over there)
    def add(a: int, b: int) -> int:
        return a + b

    def fail(message: str) -> None:
        raise ValueError(message)

    definition = {"executor": "stdio", "executor_config": {"command": [str(wove2_python), "-m", "wove.stdio_worker"]}}
    async with ExecutorRuntime({"old": definition}) as runtime:
        assert await runtime.call("old", add, 2, 3) == 5
        with pytest.raises(ValueError, match=r"from 2\.x"):
            await runtime.call("old", fail, "from 2.x")
    (ok,) = otel.finished("wove/add")
    assert ok.attributes is not None and ok.attributes[names.WOVE_OUTCOME] == "ok"
    (failed,) = otel.finished("wove/fail")
    assert failed.attributes is not None and failed.attributes[names.WOVE_OUTCOME] == "error"
