"""Plugin registration and import weight."""

from __future__ import annotations

import subprocess
import sys

from wove.backend import BackendAdapterEnvironmentExecutor, get_backend_adapter_class
from wove.environment import build_executor_from_name
from wove_executor_arq import ARQAdapter


def test_plugin_import_does_not_import_arq() -> None:
    code = ("import sys, wove_executor_arq, wove_executor_arq.plugin; "
            "print(sorted(m for m in ('arq', 'redis', 'uvicorn', 'cloudpickle') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_resolves_by_its_wove_2x_name() -> None:
    executor = build_executor_from_name("arq")
    assert isinstance(executor, BackendAdapterEnvironmentExecutor)
    assert get_backend_adapter_class("arq") is ARQAdapter


def test_worker_settings_keep_wove_s_function_and_add_the_given_ones() -> None:
    from wove_executor_arq.worker import FUNCTIONS, worker_settings

    async def other(ctx: dict, x: int) -> int:
        return x

    settings = worker_settings(functions=[other], max_jobs=4)
    assert settings["functions"][: len(FUNCTIONS)] == FUNCTIONS and settings["functions"][-1] is other
    assert settings["allow_abort_jobs"] is True and settings["max_jobs"] == 4
    assert FUNCTIONS[0].name == "wove_run_backend_payload"  # the function name Wove 2.x enqueues
