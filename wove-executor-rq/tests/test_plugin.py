"""Plugin registration and import weight."""

from __future__ import annotations

import subprocess
import sys

from wove.backend import BackendAdapterEnvironmentExecutor, get_backend_adapter_class
from wove.environment import build_executor_from_name
from wove_executor_rq import RQAdapter


def test_plugin_import_imports_neither_rq_nor_redis() -> None:
    code = ("import sys, wove_executor_rq, wove_executor_rq.plugin; "
            "print(sorted(m for m in ('rq', 'redis', 'uvicorn', 'cloudpickle') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_resolves_by_its_wove_2x_name() -> None:
    executor = build_executor_from_name("rq")
    assert isinstance(executor, BackendAdapterEnvironmentExecutor)
    assert get_backend_adapter_class("rq") is RQAdapter
