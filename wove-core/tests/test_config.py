"""Environments from wove.toml and [tool.wove]; bad config fails at load with the key and fix."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from wove.config import find_config_file, load_config, validate_definition
from wove.environment import ExecutorRuntime
from wove.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


async def test_wove_toml_environments_run(tmp_path: Path) -> None:
    file = write(tmp_path / "wove.toml", """
        default_environment = "fast"

        [environments.fast]
        executor = "local"
        max_workers = 4
        delivery_timeout = 30
        delivery_orphan_policy = "fail"
        delivery_idempotency_key = "job-{n}"
    """)
    config = load_config(file)
    assert config.default_environment == "fast"
    assert config.environments["fast"]["max_workers"] == 4
    async with ExecutorRuntime(config.environments, config.run_config()) as runtime:
        assert await runtime.run_task(task_name="sq", task_func=lambda n: n * n, task_args={"n": 9}, task_info={}) == 81


def test_pyproject_tool_wove_is_found_from_a_subfolder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "pyproject.toml", """
        [project]
        name = "app"
        [tool.wove.environments.default]
        executor = "local"
    """)
    sub = tmp_path / "src" / "app"
    sub.mkdir(parents=True)
    monkeypatch.delenv("WOVE_CONFIG", raising=False)
    assert find_config_file(sub) == tmp_path / "pyproject.toml"
    monkeypatch.chdir(sub)
    assert list(load_config().environments) == ["default"]


@pytest.mark.parametrize(("body", "message"), [
    ('[environments.a]\nexecutor = "lokal"\n', r"environment 'a': Unknown executor 'lokal'.*Did you mean 'local'"),
    ('[environments.a]\ndelivery_timeout = "soon"\n', r"environment 'a': delivery_timeout must be a positive number of seconds, got 'soon'\. Set delivery_timeout = 30"),
    ('[environments.a]\ndelivery_orphan_policy = "maybe"\n', r"delivery_orphan_policy must be one of 'fail', 'cancel', 'requeue', 'detach', got 'maybe'"),
    ('[environments.a]\ndelivery_max_in_flight = 0\n', r"delivery_max_in_flight must be a positive integer, got 0"),
    ('[environments.a]\nurl = "http://x"\n', r"key\(s\) 'url' are not environment settings.*executor options go in executor_config"),
    ('[environments.a]\nexecutor_config = 3\n', r"executor_config must be a table/dict, got int"),
    ('default_environment = "nope"\n[environments.a]\nexecutor = "local"\n', r"default_environment = 'nope' names no environment; defined: a"),
    ('colour = "blue"\n', r"unknown key\(s\) 'colour'"),
    ('[environments\n', r"not valid TOML"),
])
def test_bad_config_names_file_key_and_fix(tmp_path: Path, body: str, message: str) -> None:
    file = write(tmp_path / "wove.toml", body)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(file)
    assert str(file) in str(info.value)


def test_validate_definition_accepts_instances_and_callables() -> None:
    from wove.environment import LocalEnvironmentExecutor

    validate_definition("x", {"executor": LocalEnvironmentExecutor(), "delivery_idempotency_key": lambda a: "k"})
    with pytest.raises(ConfigError, match="must be an executor name or an EnvironmentExecutor, got int"):
        validate_definition("x", {"executor": 5})


def test_a_definition_must_name_its_executor_unless_it_is_local(tmp_path: Path) -> None:
    file = write(tmp_path / "wove.toml", '[environments.gpu]\ndelivery_timeout = 30\n')
    with pytest.raises(ConfigError, match=r"environment 'gpu' names no executor\. Add executor = \"local\""):
        load_config(file)
    validate_definition("local", {"delivery_timeout": 30})
