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
    assert ep and ep[0].value == "wove._local_plugin"
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


def test_named_entry_point_is_loaded_first(plugin_dir: Path) -> None:
    eps = [
        write_plugin(plugin_dir, "plug_first", ECHO.format(name="first", aliases=())),
        write_plugin(plugin_dir, "plug_other", "raise RuntimeError('must not be imported')"),
    ]
    registry = Registry(entry_points=eps)
    assert registry.lookup("first") is not None
    assert {p.name: p.status for p in registry._plugins.values()}["other"] == "not loaded"


def test_duplicate_names_name_both_plugins(plugin_dir: Path) -> None:
    eps = [
        write_plugin(plugin_dir, "plug_one", ECHO.format(name="same", aliases=())),
        write_plugin(plugin_dir, "plug_two", ECHO.format(name="same", aliases=())),
    ]
    registry = Registry(entry_points=eps)
    with pytest.raises(ConfigError, match=r"'same' is registered twice: by plugin 'one' .* and by plugin 'two'"):
        registry.load_all()


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
