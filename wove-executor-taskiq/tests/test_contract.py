"""The core executor contract, on a real ``taskiq worker`` with taskiq-redis on the machine's Redis."""

from __future__ import annotations

from typing import Any

import pytest

from wove.testing import ExecutorContract


class TestTaskiqContract(ExecutorContract):
    @pytest.fixture
    def executor_name(self) -> str:
        return "taskiq"

    @pytest.fixture
    def executor_config(self, taskiq_worker: Any) -> dict[str, Any]:
        return {"broker": taskiq_worker.broker_path}
