"""The core executor contract, on the session's Ray head (tasks run in Ray worker processes)."""

from __future__ import annotations

from typing import Any

import pytest

from wove.testing import ExecutorContract

pytestmark = pytest.mark.timeout(150)  # the first test also waits for the session's Ray head


class TestRayContract(ExecutorContract):
    @pytest.fixture
    def executor_name(self) -> str:
        return "ray"

    @pytest.fixture
    def executor_config(self, ray_connected: str) -> dict[str, Any]:
        return {"address": ray_connected}
