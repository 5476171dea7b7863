"""Plugin registration and import weight."""

from __future__ import annotations

import subprocess
import sys

from wove.backend import BackendAdapterEnvironmentExecutor, get_backend_adapter_class
from wove.environment import build_executor_from_name
from wove_executor_taskiq import TaskiqAdapter


def test_plugin_import_does_not_import_taskiq() -> None:
    code = ("import sys, wove_executor_taskiq, wove_executor_taskiq.plugin; "
            "print(sorted(m for m in ('taskiq', 'taskiq_redis', 'redis', 'uvicorn', 'cloudpickle') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_resolves_by_its_wove_2x_name() -> None:
    executor = build_executor_from_name("taskiq")
    assert isinstance(executor, BackendAdapterEnvironmentExecutor)
    assert get_backend_adapter_class("taskiq") is TaskiqAdapter


def test_register_uses_the_wove_2x_task_name() -> None:
    from taskiq import InMemoryBroker

    from wove_executor_taskiq.worker import register

    broker = InMemoryBroker()
    task = register(broker)
    assert task.task_name == "wove.run_backend_payload"
    assert broker.find_task("wove.run_backend_payload") is task
