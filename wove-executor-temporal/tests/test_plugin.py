"""Plugin registration, import weight, executor_config validation, the worker's command line."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from wove.backend import BackendAdapterEnvironmentExecutor, get_backend_adapter_class
from wove.environment import ExecutorRuntime, build_executor_from_name
from wove.errors import ConfigError
from wove_executor_temporal import TEMPORAL_OPTIONS, WORKFLOW_NAME, TemporalAdapter, workflow_id


def test_plugin_import_does_not_import_temporalio() -> None:
    code = ("import sys, wove_executor_temporal, wove_executor_temporal.plugin; "
            "print(sorted(m for m in ('temporalio', 'uvicorn', 'cloudpickle') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_resolves_by_name_and_adapter_lookup() -> None:
    executor = build_executor_from_name("temporal")
    assert isinstance(executor, BackendAdapterEnvironmentExecutor)
    assert executor is not build_executor_from_name("temporal")
    assert get_backend_adapter_class("temporal") is TemporalAdapter


def test_the_wove_2x_keys_are_known() -> None:
    assert {"client", "target_host", "connect_options", "workflow", "task_queue", "workflow_id_prefix",
            "start_options", "callback_url", "result_channel", "max_deliveries"} <= set(TEMPORAL_OPTIONS.options)
    assert TEMPORAL_OPTIONS.options["workflow"].default == WORKFLOW_NAME == "WovePayloadWorkflow"


def test_workflow_ids() -> None:
    assert workflow_id("wove", "add:1f") == "wove-add:1f"  # Wove 2.x's id
    assert workflow_id("wove", "add:1f", attempt=2) == "wove-add:1f#2"
    assert workflow_id("jobs", "add:1f", "report-7", attempt=3) == "jobs-report-7"


@pytest.mark.parametrize(("config", "match"), [
    ({"task_queu": "q"}, r"temporal executor: executor_config key 'task_queu' \(did you mean 'task_queue'\?\) is not "
                         r"a temporal executor option\. Known keys: .*workflow_id_prefix"),
    ({"target_hots": "x:1"}, r"did you mean 'target_host'\?"),
    ({"start_options": {"id": "mine"}}, r"start_options must be a dict of client\.start_workflow keyword arguments, "
                                        r"got \{'id': 'mine'\}; it may not set 'id'"),
    ({"start_options": []}, r"start_options must be a dict"),
    ({"client": "127.0.0.1:7233"}, r"client must be a connected temporalio\.client\.Client, got '127\.0\.0\.1:7233'"),
    ({"workflow": 42}, r"workflow must be a workflow type name, or a workflow class or its run method, got 42"),
    ({"activity_heartbeat_timeout": 0}, r"activity_heartbeat_timeout must be a positive number of seconds, got 0"),
    ({"task_queue": 5}, r"task_queue must be a string, got 5"),
    ({"result_channel": "pigeon"}, r"result_channel must be one of 'auto', 'callback', 'engine', got 'pigeon'"),
])
async def test_unknown_keys_and_bad_values_fail_at_start(config: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        async with ExecutorRuntime({"t": {"executor": "temporal", "executor_config": config}}, {}):
            pass


def _worker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wove_executor_temporal.worker", *args], capture_output=True,
                          text=True, timeout=60)


def test_worker_command_line_errors() -> None:
    bad = _worker("--max-concurrent-activities", "0")
    assert bad.returncode == 2 and "--max-concurrent-activities must be at least 1, got 0" in bad.stderr
    bad = _worker("--heartbeat-throttle", "0")
    assert bad.returncode == 2 and "--heartbeat-throttle must be a positive number of seconds" in bad.stderr
    down = _worker("--target-host", "127.0.0.1:9", "--connect-timeout", "2")
    assert down.returncode == 1
    assert "cannot connect to the Temporal server at 127.0.0.1:9 (namespace default) within 2 s" in down.stderr
