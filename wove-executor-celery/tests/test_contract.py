"""The core executor contract, on a real prefork ``celery worker`` with Redis as broker and result backend."""

from __future__ import annotations

from typing import Any

import pytest

from wove.testing import ExecutorContract


class TestCeleryContract(ExecutorContract):
    @pytest.fixture
    def executor_name(self) -> str:
        return "celery"

    @pytest.fixture
    def executor_config(self, redis_worker: Any) -> dict[str, Any]:
        return dict(redis_worker.executor_config())
