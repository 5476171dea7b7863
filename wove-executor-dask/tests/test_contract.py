"""The core executor contract, on an embedded in-process LocalCluster (quick to start)."""

from __future__ import annotations

from typing import Any

import pytest

from wove.testing import ExecutorContract


class TestDaskContract(ExecutorContract):
    @pytest.fixture
    def executor_name(self) -> str:
        return "dask"

    @pytest.fixture
    def executor_config(self) -> dict[str, Any]:
        return {"n_workers": 2, "processes": False, "threads_per_worker": 4}
