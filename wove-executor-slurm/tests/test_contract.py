"""The core executor contract, on the one-node Slurm cluster (each run a real batch job)."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from wove.testing import ExecutorContract


@pytest.mark.usefixtures("slurm_cluster")
class TestSlurmContract(ExecutorContract):
    # each run is a batch job starting a Python process: slower than a worker service
    contract_timeout = 120.0

    @pytest.fixture
    def executor_name(self) -> str:
        return "slurm"

    @pytest.fixture
    def executor_config(self) -> dict[str, Any]:
        return {"command": f"{sys.executable} -m wove_executor_slurm.job", "poll_interval": 0.2}

    def test_many_concurrent_runs(self, environment_definition: dict[str, Any]) -> None:
        pytest.skip("200 concurrent batch jobs: test_slurm.py::test_500_tasks_with_64_in_flight covers many runs")
