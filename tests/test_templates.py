"""The executor-plugin template installs on its own and passes the contract kit."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_executor_plugin_template_passes_the_contract(tmp_path: Path, throwaway_venv: Any) -> None:
    project = tmp_path / "wove-executor-example"
    shutil.copytree(ROOT / "templates" / "executor-plugin", project)
    throwaway_venv.install(f"wove-core[dispatch] @ {(ROOT / 'wove-core').as_uri()}", f"{project}[test]")
    python, env = throwaway_venv.python, throwaway_venv.env
    run = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout", "60",
                          str(project / "tests")], capture_output=True, text=True, timeout=240, env=env, cwd=project)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "passed" in run.stdout
