"""The core executor contract, on a real arq worker on the machine's Redis."""

from __future__ import annotations

from typing import Any

import pytest

from wove.testing import ExecutorContract


class TestArqContract(ExecutorContract):
    @pytest.fixture
    def executor_name(self) -> str:
        return "arq"

    @pytest.fixture
    def executor_config(self, arq_worker: Any) -> dict[str, Any]:
        return {"redis_settings": arq_worker.url, "queue_name": arq_worker.queue}
