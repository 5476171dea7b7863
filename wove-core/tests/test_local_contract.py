import pytest

from wove.testing import ExecutorContract


class TestLocalContract(ExecutorContract):
    @pytest.fixture
    def executor_name(self) -> str:
        return "local"
    expect_streaming = True
