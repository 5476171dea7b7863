"""Every program in examples/ runs and prints what it says it does.

Each runs as a user would run it (``python examples/<name>.py``) in a temporary working
directory, with a timeout; the plugin example is first installed into a temporary folder
(``uv pip install --target``, or pip), which is then put on ``PYTHONPATH`` so its entry
point is found.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# program -> lines its output must contain (the figures it computes are checked by the program itself)
EXPECTED = {
    "stdio_progress_map.py": ["48/48 finished (0 failed)", "48 limits, 163718 primes counted"],
    "tls_signed_worker.py": ["hello from", "without the secret: EnvironmentExecutionError", "HTTP 401"],
    "starlette_app.py": ["ok", "144 computed by the web application's process: True"],
    "dask_cluster.py": ["pi is about 3.1", "from 16 tasks on", "not among them: True"],
}


def run(args: list[str], cwd: Path, *, env: dict[str, str] | None = None, timeout: float = 90) \
        -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("WOVE_")}
    environment.update(env or {})
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=environment,
                          stdin=subprocess.DEVNULL)


def test_every_example_is_tested_and_listed() -> None:
    programs = sorted(p.name for p in EXAMPLES.glob("*.py"))
    assert programs == sorted(EXPECTED), "add the new example to EXPECTED (and to examples/README.md)"
    listing = (EXAMPLES / "README.md").read_text(encoding="utf-8")
    for name in [*programs, "plugin/"]:
        assert f"`{name}`" in listing, f"examples/README.md does not list {name}"


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.parametrize("program", sorted(EXPECTED))
def test_example_runs(program: str, tmp_path: Path) -> None:
    result = run([sys.executable, str(EXAMPLES / program)], tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"examples/{program} exited with {result.returncode}:\n{output[-4000:]}"
    for expected in EXPECTED[program]:
        assert expected in result.stdout, f"examples/{program} did not print {expected!r}:\n{output[-4000:]}"


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_plugin_example_installs_and_runs_by_name(tmp_path: Path) -> None:
    target = tmp_path / "site"
    uv = shutil.which("uv")
    installer = ([uv, "pip", "install", "--quiet", "--python", sys.executable] if uv
                 else [sys.executable, "-m", "pip", "install", "--quiet"])
    installed = run([*installer, "--no-deps", "--target", str(target), str(EXAMPLES / "plugin")], tmp_path,
                    timeout=150)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    env = {"PYTHONPATH": str(target)}
    result = run([sys.executable, str(EXAMPLES / "plugin" / "demo.py")], tmp_path, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        "hello, plugin", "['hello, a', 'hello, b']", "audit.jsonl holds 6 events: 3 runs, 3 results"]
    listed = run([sys.executable, "-m", "wove.cli", "executors"], tmp_path, env=env)
    assert any(line.split()[:3] == ["audited", "wove-executor-audited", "0.1.0"]
               for line in listed.stdout.splitlines()), listed.stdout
    # its option spec rejects a misspelt key like the built-in executors do
    misspelt = run([sys.executable, "-c", "import asyncio\nfrom wove.environment import ExecutorRuntime\n"
                    "async def main():\n"
                    "    async with ExecutorRuntime({'a': {'executor': 'audited', "
                    "'executor_config': {'log_fil': 'x'}}}):\n"
                    "        pass\n"
                    "asyncio.run(main())\n"], tmp_path, env=env)
    assert misspelt.returncode == 1
    assert "executor_config key 'log_fil' (did you mean 'log_file'?) is not a audited executor option" \
        in misspelt.stderr, misspelt.stderr
