"""The core executor contract, on a real ``rq worker`` (fork per job) on the machine's Redis."""

from __future__ import annotations

from typing import Any

import pytest

from wove.testing import ExecutorContract


class TestRQContract(ExecutorContract):
    @pytest.fixture
    def executor_name(self) -> str:
        return "rq"

    @pytest.fixture
    def executor_config(self, rq_worker: Any) -> dict[str, Any]:
        return {"redis_url": rq_worker.url, "queue_name": rq_worker.queue}
