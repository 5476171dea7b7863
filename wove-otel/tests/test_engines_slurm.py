"""One trace across the caller and real Slurm jobs on the one-node test cluster
(wove-executor-slurm's ``slurm_cluster`` fixture: the cluster start_slurm.sh runs), each job's
command being the traced launcher around ``python -m wove_executor_slurm.job``."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from wove.environment import ExecutorRuntime

from ._engine_traces import check_one_trace, engine_conftest, traced
from .conftest import Telemetry

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

pytest.importorskip("wove_executor_slurm")
#: ``slurm_cluster`` (session scope): the cluster's slurm.conf (set as SLURM_CONF), or the skip saying why
slurm_cluster = engine_conftest("wove-executor-slurm").slurm_cluster


async def test_caller_and_slurm_job_spans_share_one_trace(slurm_cluster: str, tmp_path: Path,
                                                          otel: Telemetry) -> None:
    spans = tmp_path / "spans"
    command = shlex.join(traced(spans, "slurm-job", "wove_executor_slurm.job"))
    config = {"command": command, "poll_interval": 0.2}
    async with ExecutorRuntime({"hpc": {"executor": "slurm", "executor_config": config}}) as runtime:
        await check_one_trace(runtime, "hpc", "slurm", spans, otel)
