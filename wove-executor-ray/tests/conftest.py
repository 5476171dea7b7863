"""Fixtures: one Ray head for the package's tests, this process's connection to it, and a head
whose workers run Wove 2.0.3 (see :mod:`ray_cluster`, which also sets Ray's environment)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .ray_cluster import (
    RAY,
    WOVE2_RAY_VENV,
    WOVE2_VERSION,
    RayHead,
    start_ray_head,
    wove2_ray_healthy,
)


@pytest.fixture(scope="package")
def ray_head() -> Iterator[RayHead]:
    """One Ray head (2 CPUs) for the tests of this package; stopped after the last of them."""
    if not RAY.exists():
        pytest.skip(f"the ray CLI is not installed next to {sys.executable} (pip install wove-executor-ray)")
    head = start_ray_head()
    try:
        yield head
    finally:
        head.stop()


@pytest.fixture(scope="package")
def ray_address(ray_head: RayHead) -> str:
    """The GCS address (127.0.0.1:port) of :func:`ray_head`."""
    return ray_head.address


@pytest.fixture(scope="package")
def ray_connected(ray_address: str) -> Iterator[str]:
    """This test process connected to :func:`ray_head` for the tests of this package.

    Executors configured with the same address then share that connection instead of
    connecting (and starting a new Ray job, with new worker processes) in every test;
    the tests that check what an executor does with a connection of its own run in
    subprocesses.
    """
    import ray

    ray.init(address=ray_address, logging_level="WARNING", log_to_driver=False)
    try:
        yield ray_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="package")
def wove2_ray_python() -> Path:
    """The interpreter of a venv with ``wove==2.0.3`` and this environment's Ray version.

    Built once under ``.cache/`` (uv when available, else venv + pip). Skips when it cannot
    be built (no package index), except under ``CI=true``.
    """
    import ray

    python = WOVE2_RAY_VENV / "bin" / "python"
    if wove2_ray_healthy(python, ray.__version__):
        return python
    shutil.rmtree(WOVE2_RAY_VENV, ignore_errors=True)
    WOVE2_RAY_VENV.parent.mkdir(parents=True, exist_ok=True)
    packages = [f"wove=={WOVE2_VERSION}", "cloudpickle", f"ray=={ray.__version__}"]
    uv = shutil.which("uv")
    if uv:
        steps = [[uv, "venv", "--quiet", "--python", sys.executable, str(WOVE2_RAY_VENV)],
                 [uv, "pip", "install", "--quiet", "--python", str(python), *packages]]
    else:
        steps = [[sys.executable, "-m", "venv", str(WOVE2_RAY_VENV)],
                 [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *packages]]
    env = {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "PYTHONPATH")}
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True, timeout=900, env=env)
        if result.returncode != 0:
            message = f"could not build the Wove 2.x + Ray venv ({' '.join(step)}):\n{result.stderr[-2000:]}"
            if os.environ.get("CI") == "true":
                pytest.fail(message)
            pytest.skip(message)
    return python


@pytest.fixture(scope="package")
def wove2_ray_head(wove2_ray_python: Path) -> Iterator[RayHead]:
    """A Ray head started from the Wove 2.x venv: its workers run Wove 2.0.3, not this project."""
    head = start_ray_head(wove2_ray_python.with_name("ray"), num_cpus=2, client_server=False)
    try:
        yield head
    finally:
        head.stop()
