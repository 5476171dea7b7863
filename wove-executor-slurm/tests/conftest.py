"""The one-node Slurm cluster of the tests (munged, slurmctld, slurmd on this machine).

``slurm_cluster`` (session) uses a cluster ``start_slurm.sh`` already started (CI runs it
first; or ``WOVE_TEST_SLURM_CONF`` names a slurm.conf), else starts one itself with its
state under a temporary directory and stops it after the session. Without the Slurm
binaries the tests skip saying how to get them (under ``CI=true`` they fail: CI must run
start_slurm.sh). When the daemons cannot run on this machine (no permission, ...), the
suite skips with the reason, under CI too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("start_slurm.sh")
DEFAULT_DIR = os.environ.get("WOVE_SLURM_DIR", "/tmp/wove-slurm")
HOW_TO = (f"Slurm is not installed: run {SCRIPT} as root (it installs Debian's slurm-wlm and munge and starts a "
          "one-node cluster), or set WOVE_TEST_SLURM_CONF to the slurm.conf of a cluster to use")


def _answers(conf: str) -> bool:
    try:
        out = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20,
                             env={**os.environ, "SLURM_CONF": conf})
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "is UP" in out.stdout


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The path of the cluster's slurm.conf; ``SLURM_CONF`` is set to it for the session."""
    given = os.environ.get("WOVE_TEST_SLURM_CONF")
    started: str | None = None
    if given:
        conf = given
        if not _answers(conf):
            pytest.fail(f"WOVE_TEST_SLURM_CONF={conf}: the cluster does not answer `scontrol ping`")
    elif shutil.which("scontrol") and _answers(f"{DEFAULT_DIR}/slurm.conf"):
        conf = f"{DEFAULT_DIR}/slurm.conf"  # start_slurm.sh ran before (CI)
    else:
        if not all(shutil.which(tool) for tool in ("sbatch", "squeue", "scancel", "slurmctld", "slurmd", "munged")):
            if os.environ.get("CI") == "true":
                pytest.fail(f"{HOW_TO} (CI=true: .ci/run must run it before the tests)")
            pytest.skip(HOW_TO)
        started = str(tmp_path_factory.mktemp("slurm"))
        result = subprocess.run(["bash", str(SCRIPT), "start", started], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            reason = (f"Slurm cannot run on this machine: `{SCRIPT} start {started}` exited {result.returncode}: "
                      f"{result.stderr.strip()[-1500:]}")
            print(reason)
            pytest.skip(reason)
        conf = f"{started}/slurm.conf"
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    try:
        yield conf
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        if started is not None:
            subprocess.run(["bash", str(SCRIPT), "stop", started], capture_output=True, timeout=60,
                           env={**os.environ, "SLURM_CONF": conf})
