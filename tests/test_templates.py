"""The executor-plugin template installs on its own and passes the contract kit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_executor_plugin_template_passes_the_contract(tmp_path: Path) -> None:
    project = tmp_path / "wove-executor-example"
    shutil.copytree(ROOT / "templates" / "executor-plugin", project)
    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    uv = shutil.which("uv")
    if uv:
        subprocess.run([uv, "venv", "--quiet", "--python", sys.executable, str(venv)], check=True, timeout=120)
        install = [uv, "pip", "install", "--quiet", "--python", str(python)]
    else:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        install = [str(python), "-m", "pip", "install", "--quiet"]
    core = f"wove-core[dispatch] @ {(ROOT / 'wove-core').as_uri()}"
    result = subprocess.run([*install, core, f"{project}[test]"], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    run = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout", "60",
                          str(project / "tests")], capture_output=True, text=True, timeout=240, env=env, cwd=project)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "passed" in run.stdout
