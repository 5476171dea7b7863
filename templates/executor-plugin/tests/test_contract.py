import pytest

from wove.testing import ExecutorContract


class TestExampleContract(ExecutorContract):
    @pytest.fixture
    def executor_name(self) -> str:
        return "example"
