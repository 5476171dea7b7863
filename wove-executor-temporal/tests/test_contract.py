"""The core executor contract, on a Temporal dev server with one real Wove Temporal worker."""

from __future__ import annotations

from typing import Any

import pytest

from wove.testing import ExecutorContract


class TestTemporalContract(ExecutorContract):
    @pytest.fixture
    def executor_name(self) -> str:
        return "temporal"

    @pytest.fixture
    def executor_config(self, temporal_server: str, module_worker: Any) -> dict[str, Any]:
        return {"target_host": temporal_server, "task_queue": module_worker.task_queue}
