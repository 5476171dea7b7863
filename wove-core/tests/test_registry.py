"""Plugin discovery: entry points, lazy loading, errors, and a real third-party distribution."""

from __future__ import annotations

import subprocess
import textwrap
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from wove.environment import LocalEnvironmentExecutor, build_executor_from_name, coerce_executor
from wove.errors import ConfigError
from wove.registry import ENTRY_POINT_GROUP, Registry

CORE = Path(__file__).resolve().parents[1]


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def write_plugin(directory: Path, module: str, body: str) -> metadata.EntryPoint:
    (directory / f"{module}.py").write_text(textwrap.dedent(body))
    return metadata.EntryPoint(name=module.removeprefix("plug_"), value=module, group=ENTRY_POINT_GROUP)


ECHO = """
    from wove import hookimpl
    from wove.local import LocalEnvironmentExecutor

    LOADED = True

    @hookimpl
    def wove_register_executors(register):
        register("{name}", LocalEnvironmentExecutor, aliases={aliases!r})
"""


def test_local_is_registered_through_the_entry_point() -> None:
    ep = [e for e in metadata.entry_points(group=ENTRY_POINT_GROUP) if e.name == "local"]
    assert ep and ep[0].dist is not None and ep[0].dist.name == "wove-core"
    assert callable(ep[0].load().wove_register_executors), "a pluggy plugin like any other"
    assert isinstance(build_executor_from_name("local"), LocalEnvironmentExecutor)
    instance = LocalEnvironmentExecutor()
    assert coerce_executor(instance) is instance
    with pytest.raises(TypeError, match="must be a string or EnvironmentExecutor"):
        coerce_executor(42)


def test_unknown_names_list_installed_names_and_install_hints() -> None:
    registry = Registry(entry_points=[])
    with pytest.raises(ValueError, match=r"Unknown executor 'grpc'\. Installed executors: \(none\)\. 'grpc' is provided by wove-executor-grpc: pip install wove-executor-grpc"):
        registry.build("grpc")
    for name, dist in [("stdio", "wove-executor-stdio"), ("https", "wove-executor-http"), ("websocket", "wove-executor-ws")]:
        assert f"pip install {dist}" in registry.unknown_message(name)


# The ten engine names Wove 2.x resolves through BackendAdapterEnvironmentExecutor(name).
WOVE2_ENGINES = ["celery", "temporal", "ray", "rq", "taskiq", "arq", "dask", "kubernetes_jobs", "aws_batch", "slurm"]


@pytest.mark.parametrize("name", WOVE2_ENGINES)
def test_every_wove2_engine_name_gets_a_hint(name: str) -> None:
    message = Registry(entry_points=[]).unknown_message(name)
    if name in ("kubernetes_jobs", "aws_batch"):
        assert "Wove 2.x engine name" in message and "docs/engines/index.md" in message
    else:
        dist = "wove-executor-" + name
        assert (f"provided by {dist}: pip install {dist} (from a checkout of this project: "
                f"pip install ./wove-core ./wove-backend ./{dist}") in message


def test_resolution_is_lazy_and_finds_names_in_any_plugin(plugin_dir: Path) -> None:
    eps = [
        write_plugin(plugin_dir, "plug_multi", ECHO.format(name="alpha", aliases=("alpha2",))),
        write_plugin(plugin_dir, "plug_broken", "raise ImportError('missing transport library')"),
    ]
    registry = Registry(entry_points=eps)
    info = registry.lookup("alpha")
    assert info is not None and info.plugin == "multi"
    assert registry.lookup("alpha2").alias_of == "alpha"  # type: ignore[union-attr]
    statuses = {p.name: p.status for p in registry.plugins()}
    assert statuses["multi"] == "loaded"
    assert statuses["broken"].startswith("failed to import: ImportError: missing transport library")
    assert "Plugin 'broken'" in registry.unknown_message("nothing")


def test_named_entry_point_is_loaded_first_and_a_broken_other_plugin_is_skipped(plugin_dir: Path) -> None:
    (plugin_dir / "load_order.py").write_text("ORDER = []\n")
    first = "import load_order\nload_order.ORDER.append('first')\n" + textwrap.dedent(ECHO.format(name="first", aliases=()))
    eps = [
        write_plugin(plugin_dir, "plug_other", "import load_order\nload_order.ORDER.append('other')\nraise RuntimeError('broken plugin')"),
        write_plugin(plugin_dir, "plug_first", first),
    ]
    registry = Registry(entry_points=eps)
    assert registry.lookup("first") is not None
    import load_order  # type: ignore[import-not-found]

    assert load_order.ORDER == ["first", "other"]
    statuses = {p.name: p.status for p in registry.plugins()}
    assert statuses == {"first": "loaded", "other": "failed to import: RuntimeError: broken plugin"}


def test_duplicate_names_name_both_plugins(plugin_dir: Path) -> None:
    eps = [
        write_plugin(plugin_dir, "plug_one", ECHO.format(name="same", aliases=())),
        write_plugin(plugin_dir, "plug_two", ECHO.format(name="same", aliases=())),
    ]
    registry = Registry(entry_points=eps)
    with pytest.raises(ConfigError, match=r"'same' is registered twice: by plugin 'one' .* and by plugin 'two'"):
        registry.load_all()


@pytest.mark.parametrize("order", [("east", "west"), ("west", "east")])
def test_resolving_a_name_two_plugins_claim_is_an_error_naming_both(plugin_dir: Path, order: tuple[str, str]) -> None:
    # the entry point named like the executor registers it; the lookup must not stop there
    suffix = "".join(name[0] for name in order)  # fresh module names per case (imports are cached)
    eps = [write_plugin(plugin_dir, f"plug_{name}{suffix}", ECHO.format(name=name, aliases=("shared",))) for name in order]
    eps.append(write_plugin(plugin_dir, f"plug_shared{suffix}", ECHO.format(name="shared", aliases=())))
    eps[-1] = metadata.EntryPoint(name="shared", value=eps[-1].value, group=ENTRY_POINT_GROUP)
    registry = Registry(entry_points=eps)
    for _attempt in range(2):  # the same answer every time, not only the first
        with pytest.raises(ConfigError, match=r"'shared' is registered 3 times: by plugin '\w+' .*, by plugin '\w+' .* and by plugin '\w+'") as info:
            registry.build("shared")
        assert all(f"plugin '{name}" in str(info.value) for name in ("east", "west", "shared"))
    assert registry.lookup("east") is not None and registry.lookup("west") is not None
    assert set(registry.conflicts()) == {"shared"}
    assert "shared" not in {info.name for info in registry.executors()}


def test_register_plugin_still_refuses_a_taken_name_at_once(plugin_dir: Path) -> None:
    registry = Registry(entry_points=[write_plugin(plugin_dir, "plug_base", ECHO.format(name="taken", aliases=()))])
    assert registry.lookup("taken") is not None
    import types

    from wove import hookimpl

    embedded = types.SimpleNamespace()
    embedded.wove_register_executors = hookimpl(lambda register: register("taken", LocalEnvironmentExecutor))
    with pytest.raises(ConfigError, match=r"'taken' is registered twice: by plugin 'base' .* and by plugin 'app'"):
        registry.register_plugin(embedded, name="app")
    assert registry.lookup("taken").plugin == "base"  # type: ignore[union-attr]


def test_a_typo_in_the_plugin_variables_is_a_warning_naming_the_known_plugins(
        plugin_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    eps = [write_plugin(plugin_dir, "plug_skip", ECHO.format(name="skip", aliases=())),
           write_plugin(plugin_dir, "plug_keep", ECHO.format(name="keep", aliases=()))]
    monkeypatch.setenv("WOVE_DISABLE_PLUGINS", "skpi")
    monkeypatch.setenv("WOVE_LOAD_PLUGINS", "skip,keep,kep")
    with caplog.at_level("WARNING", logger="wove.registry"):
        registry = Registry(entry_points=eps)
        assert registry.lookup("skip") is not None
        registry.plugins()
    messages = [r.getMessage() for r in caplog.records]
    disable = [m for m in messages if m.startswith("WOVE_DISABLE_PLUGINS")]
    load = [m for m in messages if m.startswith("WOVE_LOAD_PLUGINS")]
    assert len(disable) == 1 and "'skpi'" in disable[0] and "installed plugins: keep, skip" in disable[0]
    assert "Did you mean 'skip'?" in disable[0]
    assert len(load) == 1 and "'kep'" in load[0] and "Did you mean 'keep'?" in load[0]


def test_plugin_api_mismatch_and_bad_factories(plugin_dir: Path) -> None:
    eps = [write_plugin(plugin_dir, "plug_future", """
        from wove import hookimpl
        @hookimpl
        def wove_register_executors(register):
            register("future", object, api=99)
    """)]
    with pytest.raises(ConfigError, match="built for Wove plugin API 99, but the installed wove-core provides API 1"):
        Registry(entry_points=eps).lookup("future")
    eps = [write_plugin(plugin_dir, "plug_wrong", """
        from wove import hookimpl
        @hookimpl
        def wove_register_executors(register):
            register("wrong", dict)
    """)]
    with pytest.raises(ConfigError, match="returned dict, not an EnvironmentExecutor"):
        Registry(entry_points=eps).build("wrong")


def test_disable_and_only_load(plugin_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    eps = [write_plugin(plugin_dir, "plug_skip", ECHO.format(name="skip", aliases=()))]
    monkeypatch.setenv("WOVE_DISABLE_PLUGINS", "skip")
    registry = Registry(entry_points=eps)
    assert registry.lookup("skip") is None
    assert registry.plugins()[0].status == "disabled"
    monkeypatch.delenv("WOVE_DISABLE_PLUGINS")
    monkeypatch.setenv("WOVE_LOAD_PLUGINS", "other")
    assert Registry(entry_points=eps).lookup("skip") is None


FAKE_DIST_PLUGIN = """
from wove import hookimpl
from wove.local import LocalEnvironmentExecutor

@hookimpl
def wove_register_executors(register):
    register("{executor}", LocalEnvironmentExecutor, description="{dist}")
"""

DUPLICATE_SCRIPT = """
import json, sys
from wove.environment import build_executor_from_name
result = {}
build_executor_from_name("local")
try:
    build_executor_from_name("lokal")
except Exception as exc:
    result["error"] = f"{type(exc).__name__}: {exc}"
from wove.config import validate_definition
try:
    validate_definition("reports", {"executor": "lokal"})
except Exception as exc:
    result["config"] = str(exc)
result["heavy"] = [m for m in ("httpx", "grpc", "websockets", "uvicorn", "dask", "distributed", "cloudpickle") if m in sys.modules]
print(json.dumps(result))
"""


def write_fake_distribution(site: Path, dist: str, ep_name: str, module: str, executor: str) -> None:
    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[wove.executors]\n{ep_name} = {module}\n")
    (site / f"{module}.py").write_text(FAKE_DIST_PLUGIN.format(executor=executor, dist=dist))


@pytest.mark.integration
def test_two_installed_distributions_claiming_one_name_fail_naming_both(tmp_path: Path) -> None:
    import json
    import os
    import sys

    site = tmp_path / "site"
    site.mkdir()
    # the first is the entry point named like the executor: the lookup must look further
    write_fake_distribution(site, "wove-executor-lokal", "lokal", "wove_lokal_plugin", "lokal")
    write_fake_distribution(site, "acme-wove-tools", "acme", "acme_wove_plugin", "lokal")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", DUPLICATE_SCRIPT], capture_output=True, text=True, timeout=60, env=env)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["error"].startswith("ConfigError: Executor name 'lokal' is registered twice")
    assert "plugin 'lokal' (wove-executor-lokal 0.1)" in result["error"]
    assert "plugin 'acme' (acme-wove-tools 0.1)" in result["error"]
    assert result["config"].startswith("Environment 'reports': Executor name 'lokal' is registered twice")
    # every plugin module was imported to find the clash, and none imported its transport
    assert result["heavy"] == []
    listing = subprocess.run([sys.executable, "-m", "wove.cli", "executors"], capture_output=True, text=True,
                             timeout=60, env=env)
    assert listing.returncode == 0, listing.stderr
    assert "executor name 'lokal' is registered twice" in listing.stdout.lower()
    assert not any(line.split()[:1] == ["lokal"] for line in listing.stdout.splitlines())


THIRD_PARTY_PYPROJECT = """
[project]
name = "wove-executor-echo"
version = "1.2.3"
dependencies = ["wove-core"]

[project.entry-points."wove.executors"]
echo = "wove_executor_echo"

[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"
"""

THIRD_PARTY_MODULE = '''
"""A third-party executor: runs tasks in process and tags results."""
from wove import hookimpl
from wove.local import LocalEnvironmentExecutor


class EchoExecutor(LocalEnvironmentExecutor):
    async def recv(self):
        event = await super().recv()
        if event.get("type") == "task_result":
            event["result"] = ("echo", event["result"])
        return event


@hookimpl
def wove_register_executors(register):
    register("echo", EchoExecutor, description="third-party test executor")
'''

THIRD_PARTY_SCRIPT = '''
import asyncio, json
from wove.environment import ExecutorRuntime, build_executor_from_name
import sys

async def main():
    executor = build_executor_from_name("echo")
    async with ExecutorRuntime({"e": {"executor": "echo"}}, {}) as runtime:
        result = await runtime.call("e", pow, 2, 10)
    mods = [m for m in ("cloudpickle", "httpx", "grpc", "websockets") if m in sys.modules]
    print(json.dumps({"type": type(executor).__name__, "result": result, "heavy": mods}))

asyncio.run(main())
'''


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_third_party_distribution_installed_in_a_venv_resolves_by_name(tmp_path: Path, throwaway_venv: Any) -> None:
    project = tmp_path / "wove-executor-echo"
    (project / "src" / "wove_executor_echo").mkdir(parents=True)
    (project / "pyproject.toml").write_text(THIRD_PARTY_PYPROJECT)
    (project / "src" / "wove_executor_echo" / "__init__.py").write_text(THIRD_PARTY_MODULE)
    throwaway_venv.install(str(CORE), str(project))
    python, env, venv_bin = throwaway_venv.python, throwaway_venv.env, throwaway_venv.bin
    run = subprocess.run([str(python), "-c", THIRD_PARTY_SCRIPT], capture_output=True, text=True, timeout=60, env=env)
    assert run.returncode == 0, run.stderr
    import json

    assert json.loads(run.stdout) == {"type": "EchoExecutor", "result": ["echo", 1024], "heavy": []}
    listing = subprocess.run([str(venv_bin / "wove"), "executors"], capture_output=True, text=True, timeout=60, env=env)
    assert listing.returncode == 0, listing.stderr
    assert any(line.split()[:3] == ["echo", "wove-executor-echo", "1.2.3"] for line in listing.stdout.splitlines())
    unknown = subprocess.run([str(python), "-c", "from wove.environment import build_executor_from_name as b; b('grpc')"],
                             capture_output=True, text=True, timeout=60, env=env)
    assert "Installed executors: echo, local" in unknown.stderr
    assert "pip install wove-executor-grpc" in unknown.stderr
    # without the service's distribution, `wove worker http` names the one to install
    service = subprocess.run([str(venv_bin / "wove"), "worker", "http", "--host", "0.0.0.0", "--port", "0"],
                             capture_output=True, text=True, timeout=60, env=env)
    assert service.returncode == 2
    assert service.stderr.strip() == ("wove worker http: no installed plugin provides the 'http' worker service. "
                                      "It is provided by wove-executor-http: pip install wove-executor-http (from a "
                                      "checkout of this project: pip install ./wove-core ./wove-executor-http, or "
                                      "uv sync --all-packages; see docs/installing.md)")
