"""``wove demo`` shows this plugin (the workspace's demo test expects every plugin with a demo hook)."""

import subprocess
import sys


def test_wove_demo_runs_the_example_environment() -> None:
    out = subprocess.run([sys.executable, "-m", "wove.cli", "demo", "--only", "example", "--tasks", "20"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith("example")]
    assert rows and rows[0][:3] == ["example", "20", "20/20"], out.stdout
