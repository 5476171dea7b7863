"""The wove command."""

from __future__ import annotations

import subprocess
import sys

from wove.cli import main


def test_executors_lists_name_distribution_and_version(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["executors"]) == 0
    out = capsys.readouterr().out
    assert any(line.split()[:2] == ["local", "wove-core"] for line in out.splitlines())


def test_demo_runs_local_and_prints_a_table(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["demo", "--only", "local", "--tasks", "50"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("local"))
    assert "50/50" in row and "µs" in row


def test_console_script_entry_point() -> None:
    out = subprocess.run([sys.executable, "-m", "wove.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "executors" in out.stdout and "worker" in out.stdout
