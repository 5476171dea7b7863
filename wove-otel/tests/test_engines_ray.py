"""One trace across the caller (the Ray driver) and a Ray worker process on a real
``ray start --head`` cluster (wove-executor-ray's ``start_ray_head``), the workers traced by
the job's ``runtime_env`` ``worker_process_setup_hook`` given in the executor's
``init_options`` (the way docs/observability.md tells Ray users to trace workers)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from wove.environment import ExecutorRuntime
from wove_otel.testing import configure

from ._engine_traces import check_one_trace, engine_conftest
from .conftest import Telemetry

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

pytest.importorskip("wove_executor_ray")
#: start_ray_head(): ``ray start --head`` on 127.0.0.1; importing it also sets Ray's loopback and no-uv
#: environment variables before ray is imported (see wove-executor-ray/tests/ray_cluster.py)
_ray = engine_conftest("wove-executor-ray", "ray_cluster.py")


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """The GCS address of a Ray head (2 CPUs) for this module."""
    if not _ray.RAY.exists():
        message = f"the ray CLI is not installed next to {sys.executable} (pip install wove-executor-ray)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message} (CI=true: a missing binary fails the run)")
        pytest.skip(message)
    head = _ray.start_ray_head()
    try:
        yield head.address
    finally:
        head.stop()


async def test_caller_and_ray_worker_spans_share_one_trace(ray_cluster: str, tmp_path: Path,
                                                           otel: Telemetry) -> None:
    spans = tmp_path / "spans"
    directory = str(spans)

    def trace_this_worker() -> None:  # every worker process of the job runs it first (a function, not a partial)
        configure(directory, "ray-worker")  # the SDK with span files, then wove_otel.instrument()

    config: dict[str, Any] = {"address": ray_cluster,
                              "init_options": {"runtime_env": {"worker_process_setup_hook": trace_this_worker},
                                               "logging_level": "WARNING", "log_to_driver": False}}
    async with ExecutorRuntime({"cluster": {"executor": "ray", "executor_config": config}}) as runtime:
        await check_one_trace(runtime, "cluster", "ray", spans, otel)
