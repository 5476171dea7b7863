"""The README's first command, ``wove demo``, across every installed executor."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import pytest

EXPECTED = {ep.name for ep in metadata.entry_points(group="wove.executors")}


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_wove_demo_runs_every_installed_executor_correctly() -> None:
    out = subprocess.run([sys.executable, "-m", "wove.cli", "demo", "--tasks", "100"],
                         capture_output=True, text=True, timeout=220)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    table = out.stdout.split("-----\n", 1)[-1].strip().splitlines()
    rows = {line.split()[0]: line for line in table}
    assert set(rows) >= EXPECTED, f"missing from the demo: {EXPECTED - set(rows)}\n{out.stdout}"
    for name, row in rows.items():
        assert "100/100" in row, f"{name}: {row}"


def test_every_distribution_exports_a_sorted_complete_all() -> None:
    import importlib

    for module_name in ("wove.environment", "wove_executor_stdio", "wove_executor_http",
                        "wove_executor_grpc", "wove_executor_ws", "wove_executor_dask"):
        module = importlib.import_module(module_name)
        exported = list(module.__all__)
        assert exported == sorted(exported), module_name
        for name in exported:
            assert getattr(module, name) is not None, f"{module_name}.{name}"
