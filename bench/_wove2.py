"""A throwaway venv with the reference ``wove==2.0.3`` from PyPI.

Its import name (``wove``) collides with ours, so it lives in its own interpreter; tests
and benchmarks run scripts there as subprocesses. The venv is cached under
``.cache/wove2-venv-<python version>`` (ignored by git) and rebuilt when missing or broken.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

WOVE2_VERSION = "2.0.3"
ROOT = Path(__file__).resolve().parent.parent
# One venv per Python version: pickled code objects only load on the version that made them.
VENV = Path(os.environ.get(
    "WOVE2_VENV", ROOT / ".cache" / f"wove2-venv-{sys.version_info[0]}.{sys.version_info[1]}"))
_lock = threading.Lock()


def _python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _healthy(python: Path) -> bool:
    if not python.exists():
        return False
    probe = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m, cloudpickle; print(m.version('wove'))"],
        capture_output=True, text=True, timeout=60,
    )
    return probe.returncode == 0 and probe.stdout.strip() == WOVE2_VERSION


def wove2_python() -> Path:
    """Return the interpreter of a venv holding wove==2.0.3 (creating it if needed).

    Raises:
        RuntimeError: the venv could not be created or the install failed (with pip's output).
    """
    with _lock:
        python = _python(VENV)
        if _healthy(python):
            return python
        shutil.rmtree(VENV, ignore_errors=True)
        VENV.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, timeout=300)
        # The reference needs grpcio / websockets only for those executors.
        packages = [f"wove=={WOVE2_VERSION}", "cloudpickle", "grpcio", "websockets"]
        result = subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *packages],
            capture_output=True, text=True, timeout=600,
        )
        if result.returncode != 0:
            raise RuntimeError(f"installing {packages} into {VENV} failed:\n{result.stdout}\n{result.stderr}")
        return python


if __name__ == "__main__":
    print(wove2_python())
