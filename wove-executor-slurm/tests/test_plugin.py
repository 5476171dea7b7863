"""Plugin registration, import weight, executor_config validation, the job program (no cluster needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from wove.backend import BackendAdapterEnvironmentExecutor, get_backend_adapter_class
from wove.environment import ExecutorRuntime, build_executor_from_name
from wove.errors import ConfigError
from wove_executor_slurm import SLURM_OPTIONS, STATUS_MARKER, SlurmAdapter, job_name, parse_status


def test_the_job_program_and_the_plugin_import_little() -> None:
    code = ("import sys, wove_executor_slurm.plugin; a = set(sys.modules); import wove_executor_slurm.job; "
            "print(sorted(m for m in ('wove_executor_slurm.adapter', 'cloudpickle', 'uvicorn', 'wove_backend') "
            "if m in sys.modules and m not in a))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_resolves_by_name_and_adapter_lookup() -> None:
    executor = build_executor_from_name("slurm")
    assert isinstance(executor, BackendAdapterEnvironmentExecutor)
    assert executor is not build_executor_from_name("slurm")
    assert get_backend_adapter_class("slurm") is SlurmAdapter


def test_the_wove_2x_keys_are_known() -> None:
    assert {"submit", "command", "sbatch", "job_name_prefix", "scancel", "callback_url", "result_channel",
            "max_deliveries", "payload_dir"} <= set(SLURM_OPTIONS.options)


def test_job_names() -> None:
    assert job_name("wove", "add:1f") == "wove-add:1f"  # Wove 2.x's name
    assert job_name("jobs", "add:1f", "report-7") == "jobs-report-7"
    odd = job_name("wove", "add:1f", "a,b c/d")
    assert odd.startswith("wove-a_b_c_d-") and "," not in odd and " " not in odd and "/" not in odd
    assert odd != job_name("wove", "add:1f", "a_b_c_d") and odd == job_name("wove", "x", "a,b c/d")


def test_parse_status() -> None:
    status = {"wove_status": 1, "posted": True, "type": "task_result", "run_id": "r"}
    text = f"some print\n{STATUS_MARKER}{json.dumps(status)}\ntrailing noise\n"
    assert parse_status(text) == status
    assert parse_status("no status here\n") is None
    assert parse_status(f"{STATUS_MARKER}{{not json\n") is None


@pytest.mark.parametrize(("config", "match"), [
    ({"sbatch_options": []}, r"slurm executor: executor_config key 'sbatch_options' \(did you mean 'sbatch'\?\) is not a slurm executor option\. "
                             r"Known keys: .*job_name_prefix"),
    ({"job_name_prefx": "x"}, r"did you mean 'job_name_prefix'\?"),
    ({"sbatch": ["sbatch", "--output=/tmp/x"]}, r"sbatch must be an sbatch command .*; it may not set "
                                                r"'--output=/tmp/x'"),
    ({"sbatch": ["sbatch", "-J", "mine"]}, r"it may not set '-J'"),
    ({"sbatch": []}, r"sbatch must be an sbatch command"),
    ({"scancel": 7}, r"scancel must be a command as a list of strings \(or one string\), got 7"),
    ({"submit": "sbatch"}, r"submit must be a callable submit\(payload, frame, config\), got 'sbatch'"),
    ({"payload_dir": "/no/such/dir"}, r"payload_dir must be the path of an existing directory, got '/no/such/dir'"),
    ({"poll_interval": 0}, r"poll_interval must be a positive number of seconds, got 0"),
])
async def test_unknown_keys_and_bad_values_fail_at_start(config: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        async with ExecutorRuntime({"s": {"executor": "slurm", "executor_config": config}}, {}):
            pass


async def test_a_missing_slurm_command_is_named() -> None:
    with pytest.raises(RuntimeError, match=r"slurm executor: '/nonexistent/sbatch' \(executor_config\.sbatch = "
                                           r"\['/nonexistent/sbatch', '--parsable'\]\) is not on PATH"):
        async with ExecutorRuntime({"s": {"executor": "slurm",
                                          "executor_config": {"sbatch": "/nonexistent/sbatch"}}}, {}):
            pass


def test_the_job_program_reports_a_missing_payload_file(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "wove_executor_slurm.job", str(tmp_path / "gone.json")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "cannot read the payload file" in run.stderr
    usage = subprocess.run([sys.executable, "-m", "wove_executor_slurm.job"], capture_output=True, text=True,
                           timeout=60)
    assert usage.returncode == 2 and "usage: python -m wove_executor_slurm.job PAYLOAD_FILE" in usage.stderr


async def test_a_controller_that_does_not_answer_fails_at_start() -> None:
    with pytest.raises(OSError, match=r"slurm executor: the Slurm controller does not answer: `false -u \S+` exited 1"):
        async with ExecutorRuntime({"s": {"executor": "slurm", "executor_config": {"squeue": ["false"]}}}, {}):
            pass
