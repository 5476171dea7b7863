"""The README's first command, ``wove demo``, across every installed executor that offers a demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

#: This project's distributions: their plugins must offer a demo (a lost hook is a bug).
OURS = frozenset({"wove-core", "wove-executor-stdio", "wove-executor-http", "wove-executor-grpc",
                  "wove-executor-ws", "wove-executor-dask"})

# What `wove demo` must show in this environment: every plugin of ours (by its entry point
# name) and every name a third-party plugin's own wove_demo_environments hook registers. A
# third-party plugin without a demo hook is not expected (installing one must not break
# the suite). Computed in a subprocess with the same environment the demo runs in.
EXPECTED_SCRIPT = """
import json
from wove.registry import get_registry

ours = set(json.loads(input()))
registry = get_registry()
plugins = {p.name: p for p in registry.plugins() if p.status == "loaded"}
expected, third_party_with_demo, without_demo = set(), set(), []
for name, plugin in plugins.items():
    if plugin.distribution in ours:
        expected.add(name)
for impl in registry.manager.hook.wove_demo_environments.get_hookimpls():
    if plugins.get(impl.plugin_name) and plugins[impl.plugin_name].distribution not in ours:
        names = []
        impl.function(register=lambda name, factory: names.append(name))
        expected.update(names)
        third_party_with_demo.add(impl.plugin_name)
for name, plugin in plugins.items():
    if plugin.distribution not in ours and name not in third_party_with_demo:
        without_demo.append(name)
print(json.dumps({"expected": sorted(expected), "without_demo": sorted(without_demo)}))
"""


def expected_demo(env: dict[str, str] | None = None) -> dict[str, list[str]]:
    out = subprocess.run([sys.executable, "-c", EXPECTED_SCRIPT], input=json.dumps(sorted(OURS)),
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def demo_rows(*args: str, env: dict[str, str] | None = None, timeout: float = 220) -> tuple[dict[str, str], str]:
    out = subprocess.run([sys.executable, "-m", "wove.cli", "demo", *args],
                         capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    table = out.stdout.split("-----\n", 1)[-1].strip().splitlines()
    return {line.split()[0]: line for line in table}, out.stdout


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_wove_demo_runs_every_installed_executor_correctly() -> None:
    expected = set(expected_demo()["expected"])
    assert expected >= {"local", "stdio", "http", "grpc", "websocket", "dask"}
    rows, stdout = demo_rows("--tasks", "100")
    assert set(rows) >= expected, f"missing from the demo: {expected - set(rows)}\n{stdout}"
    for name, row in rows.items():
        assert "100/100" in row, f"{name}: {row}"


FAKE_PLUGIN = """
import contextlib
from wove import hookimpl
from wove.local import LocalEnvironmentExecutor

@hookimpl
def wove_register_executors(register):
    register("{name}", LocalEnvironmentExecutor)
"""

FAKE_DEMO = """
@contextlib.asynccontextmanager
async def _demo():
    yield {{"executor": "{name}"}}

@hookimpl
def wove_demo_environments(register):
    register("{name}", _demo)
"""


def install_fake_plugin(site: Path, name: str, *, demo: bool) -> None:
    """A third-party distribution as an installer leaves it: a .dist-info with an entry point."""
    info = site / f"acme_{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: acme-{name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[wove.executors]\n{name} = acme_{name}_plugin\n")
    body = FAKE_PLUGIN.format(name=name) + (FAKE_DEMO.format(name=name) if demo else "")
    (site / f"acme_{name}_plugin.py").write_text(body)


@pytest.mark.integration
def test_a_third_party_plugin_is_expected_in_the_demo_only_when_it_has_a_demo_hook(tmp_path: Path) -> None:
    install_fake_plugin(tmp_path, "nodemo", demo=False)
    install_fake_plugin(tmp_path, "withdemo", demo=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    found = expected_demo(env)
    assert "withdemo" in found["expected"] and "nodemo" not in found["expected"]
    # engines that need a service of their own (Redis, a Ray head...) have no demo either
    assert "nodemo" in found["without_demo"] and "withdemo" not in found["without_demo"]
    rows, stdout = demo_rows("--only", "local,withdemo", "--tasks", "20", env=env, timeout=60)
    assert set(rows) == {"local", "withdemo"} and all("20/20" in row for row in rows.values()), stdout


def test_every_distribution_exports_a_sorted_complete_all() -> None:
    import importlib

    for module_name in ("wove.environment", "wove_backend", "wove_otel", "wove_executor_stdio",
                        "wove_executor_http", "wove_executor_grpc", "wove_executor_ws", "wove_executor_dask",
                        "wove_executor_ray", "wove_executor_celery", "wove_executor_rq", "wove_executor_arq",
                        "wove_executor_taskiq", "wove_executor_temporal", "wove_executor_slurm"):
        module = importlib.import_module(module_name)
        exported = list(module.__all__)
        # sorted, plainly or as ruff's RUF022 sorts it (CONSTANTS, then Classes, then functions)
        isort_style = sorted(exported, key=lambda n: (0 if n.isupper() else 1 if n[:1].isupper() else 2, n))
        assert exported in (sorted(exported), isort_style), module_name
        assert len(set(exported)) == len(exported), module_name
        for name in exported:
            assert getattr(module, name) is not None, f"{module_name}.{name}"
