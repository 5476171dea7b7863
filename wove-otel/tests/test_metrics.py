"""Metrics through the OpenTelemetry API, read with the SDK's InMemoryMetricReader."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from wove.environment import DeliveryTimeoutError, ExecutorRuntime
from wove.testing import tasks
from wove_otel import names

from .conftest import Telemetry

ALLOWED_KEYS = {names.WOVE_ENVIRONMENT, names.WOVE_EXECUTOR, names.WOVE_OUTCOME, names.ERROR_TYPE, names.WOVE_WORKER}
METRICS = (names.RUN_DURATION, names.RUN_ACTIVE, names.RUN_OUTCOMES, names.RUN_REDELIVERIES, names.RUN_REQUEST_SIZE,
           names.EXECUTION_DURATION, names.EXECUTION_ACTIVE)


def _by(points: list[Any], **attributes: str) -> list[Any]:
    return [p for p in points if all(p.attributes.get(k) == v for k, v in attributes.items())]


def _crash_once(marker: str) -> int:
    if not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        os._exit(7)
    return os.getpid()


@pytest.mark.integration
async def test_run_metrics_by_environment_executor_and_outcome(otel: Telemetry, tmp_path: Path) -> None:
    stdio, local = f"stdio-{uuid.uuid4().hex[:8]}", f"local-{uuid.uuid4().hex[:8]}"
    definitions = {stdio: {"executor": "stdio"}, local: {"executor": "local"}}
    async with ExecutorRuntime(definitions) as runtime:
        assert await asyncio.gather(*(runtime.call(stdio, tasks.add, i, 1) for i in range(3))) == [1, 2, 3]
        with pytest.raises(tasks.ContractTaskError):
            await runtime.call(stdio, tasks.fail, "no")
        with pytest.raises(DeliveryTimeoutError):
            await runtime.call_with(stdio, tasks.sleep, (5.0,), delivery_timeout=0.2)
        await runtime.call_with(stdio, _crash_once, (str(tmp_path / "m"),), delivery_orphan_policy="requeue")
        assert await runtime.call(local, tasks.add, 2, 2) == 4       # frames through the in-process engine
        assert await runtime.call(local, tasks.echo, "x") == "x"     # awaited inline
        slow = runtime.submit(stdio, tasks.sleep, 0.5)
        await asyncio.sleep(0.2)
        active = _by(otel.points(names.RUN_ACTIVE), **{names.WOVE_ENVIRONMENT: stdio})
        assert [p.value for p in active] == [1]  # the slow run is in flight
        await slow

    outcomes = _by(otel.points(names.RUN_OUTCOMES), **{names.WOVE_ENVIRONMENT: stdio, names.WOVE_EXECUTOR: "stdio"})
    counts = {(p.attributes[names.WOVE_OUTCOME], p.attributes.get(names.ERROR_TYPE)): p.value for p in outcomes}
    assert counts == {("ok", None): 5, ("error", "ContractTaskError"): 1, ("timeout", "DeliveryTimeoutError"): 1}
    durations = _by(otel.points(names.RUN_DURATION), **{names.WOVE_ENVIRONMENT: stdio, names.WOVE_OUTCOME: "ok"})
    assert [p.count for p in durations] == [5] and durations[0].sum > 0.5  # the slow run alone took 0.5 s
    timeout = _by(otel.points(names.RUN_DURATION), **{names.WOVE_ENVIRONMENT: stdio, names.WOVE_OUTCOME: "timeout"})
    assert [p.count for p in timeout] == [1] and timeout[0].min >= 0.2
    assert [p.value for p in _by(otel.points(names.RUN_ACTIVE), **{names.WOVE_ENVIRONMENT: stdio})] == [0]
    redeliveries = _by(otel.points(names.RUN_REDELIVERIES), **{names.WOVE_ENVIRONMENT: stdio})
    assert [p.value for p in redeliveries] == [1]
    sizes = _by(otel.points(names.RUN_REQUEST_SIZE), **{names.WOVE_ENVIRONMENT: stdio})
    assert [p.count for p in sizes] == [7] and sizes[0].min > 100  # bytes per run_task (first deliveries)

    local_outcomes = _by(otel.points(names.RUN_OUTCOMES), **{names.WOVE_ENVIRONMENT: local})
    assert [(p.attributes[names.WOVE_EXECUTOR], p.value) for p in local_outcomes] == [("local", 2)]
    executions = _by(otel.points(names.EXECUTION_DURATION), **{names.WOVE_WORKER: "local", names.WOVE_OUTCOME: "ok"})
    assert executions and executions[0].count >= 1  # the framed local run executed in this process
    assert all(p.value == 0 for p in _by(otel.points(names.EXECUTION_ACTIVE), **{names.WOVE_WORKER: "local"}))


async def test_metric_attributes_are_bounded(otel: Telemetry) -> None:
    environment = f"bounded-{uuid.uuid4().hex[:8]}"
    async with ExecutorRuntime({environment: {"executor": "local"}}) as runtime:
        await asyncio.gather(*(runtime.call(environment, tasks.add, i, i) for i in range(20)))
    seen: set[str] = set()
    for metric in METRICS:
        for point in otel.points(metric):
            seen.update(point.attributes)
    assert seen and seen <= ALLOWED_KEYS, seen - ALLOWED_KEYS  # no run_id, no task name: bounded
    outcomes = _by(otel.points(names.RUN_OUTCOMES), **{names.WOVE_ENVIRONMENT: environment})
    assert [p.value for p in outcomes] == [20]  # twenty runs, one series
