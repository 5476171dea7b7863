"""Environment definitions: validation, and loading from ``wove.toml`` or ``pyproject.toml``.

An environment definition is a dict (or a TOML table ``[environments.NAME]``) with:

``executor``
    executor name (``"local"``, ``"stdio"``, ``"grpc"``...) or an executor instance;
    required, except for an environment named ``local``.
``executor_config``
    table passed to the executor's ``start()`` (its keys are the executor's own).
``delivery_timeout``, ``delivery_heartbeat_seconds``
    seconds (positive numbers).
``delivery_cancel_mode``
    ``best_effort`` or ``require_ack``.
``delivery_orphan_policy``
    ``fail``, ``cancel``, ``requeue`` or ``detach``.
``delivery_max_in_flight``
    positive integer: run_task frames outstanding at once.
``delivery_idempotency_key``
    string or format string over the task's arguments (or a callable, in Python).
``delivery_stream_window``
    positive integer (default 16): items a streamed run's worker may produce ahead of
    the consumer (``runtime.stream``).
``max_workers``
    threads for sync callables of the ``local`` executor (an error for any executor
    whose ``executor_config`` has no ``max_workers`` key).
``capture_output``
    ``true`` (the default) or ``false``: a task's ``print()`` and ``logging`` output on a
    worker comes back to the caller's stderr and loggers, tagged with the task and the
    environment (in-process executors print directly and ignore it).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .protocol import CANCEL_MODES, ORPHAN_POLICIES

__all__ = ["DEFINITION_KEYS", "WoveConfig", "find_config_file", "load_config", "validate_definition"]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFINITION_KEYS = frozenset({
    "executor",
    "executor_config",
    "delivery_timeout",
    "delivery_heartbeat_seconds",
    "delivery_cancel_mode",
    "delivery_orphan_policy",
    "delivery_max_in_flight",
    "delivery_idempotency_key",
    "delivery_stream_window",
    "max_workers",
    "capture_output",
})


@dataclass
class WoveConfig:
    """Environments loaded from a file."""

    environments: dict[str, dict[str, Any]] = field(default_factory=dict)
    default_environment: str | None = None
    path: Path | None = None

    def run_config(self) -> dict[str, Any]:
        return {"default_environment": self.default_environment} if self.default_environment else {}


def _fail(where: str, key: str, problem: str, fix: str) -> ConfigError:
    return ConfigError(f"{where}: {key} {problem}. {fix}")


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def validate_definition(name: str, definition: Any, *, source: str | None = None, check_executor: bool = True) -> None:
    """Check an environment definition; raise :class:`ConfigError` saying the key and the fix.

    Args:
        name: the environment name.
        definition: the definition mapping.
        source: the file it came from, for the message.
        check_executor: also check that a named executor is installed.

    ``executor`` is required, except for an environment named ``local`` (which then
    runs on the local executor).
    """
    where = f"{source}: environment '{name}'" if source else f"Environment '{name}'"
    if not isinstance(definition, dict):
        raise ConfigError(f"{where} must be a table/dict of settings, got {type(definition).__name__}.")
    unknown = sorted(set(definition) - DEFINITION_KEYS)
    if unknown:
        raise _fail(where, f"key(s) {', '.join(map(repr, unknown))}", "are not environment settings",
                    f"Known keys: {', '.join(sorted(DEFINITION_KEYS))}; executor options go in executor_config.")
    executor = definition.get("executor", "local")
    from .executor import EnvironmentExecutor

    if isinstance(executor, str):
        if check_executor:
            from .registry import get_registry

            registry = get_registry()
            try:
                found = registry.lookup(executor)
            except ConfigError as exc:  # two installed plugins claim the name
                raise ConfigError(f"{where}: {exc}") from None
            if found is None:
                raise ConfigError(f"{where}: {registry.unknown_message(executor)}")
    elif not isinstance(executor, EnvironmentExecutor) and not (
        isinstance(executor, type) and issubclass(executor, EnvironmentExecutor)
    ):
        raise _fail(where, "executor", f"must be an executor name or an EnvironmentExecutor, got {type(executor).__name__}",
                    'Write executor = "local" (or another installed name).')
    executor_config = definition.get("executor_config")
    if executor_config is not None and not isinstance(executor_config, dict):
        raise _fail(where, "executor_config", f"must be a table/dict, got {type(executor_config).__name__}",
                    "Put the executor's options in [environments.NAME.executor_config].")
    for key in ("delivery_timeout", "delivery_heartbeat_seconds"):
        value = definition.get(key)
        if value is not None and not _positive_number(value):
            raise _fail(where, key, f"must be a positive number of seconds, got {value!r}", f"Set {key} = 30 (for example) or remove it.")
    for key in ("delivery_max_in_flight", "max_workers", "delivery_stream_window"):
        value = definition.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise _fail(where, key, f"must be a positive integer, got {value!r}", f"Set {key} = 64 (for example) or remove it.")
    capture = definition.get("capture_output")
    if capture is not None and not isinstance(capture, bool):
        raise _fail(where, "capture_output", f"must be true or false, got {capture!r}",
                    "Write capture_output = false to keep a task's print() and logging output on the worker "
                    "(the default, true, sends it to the caller).")
    check_choice(definition.get("delivery_cancel_mode"), "delivery_cancel_mode", CANCEL_MODES, where)
    check_choice(definition.get("delivery_orphan_policy"), "delivery_orphan_policy", ORPHAN_POLICIES, where)
    key_value = definition.get("delivery_idempotency_key")
    if key_value is not None and not isinstance(key_value, str) and not callable(key_value):
        raise _fail(where, "delivery_idempotency_key", f"must be a string, format string or callable, got {type(key_value).__name__}",
                    'Write delivery_idempotency_key = "report-{day}" (fields are task arguments).')
    if definition.get("executor") is None and name != "local":
        raise ConfigError(
            f"{where} names no executor. Add executor = \"local\" to run its tasks in this process "
            '(in Python: {"executor": "local"}), or name an installed executor such as "stdio" or "grpc". '
            "Only an environment named 'local' may leave it out."
        )


def check_choice(value: Any, key: str, allowed: tuple[str, ...], where: str) -> None:
    """Raise ValueError naming ``key``, the value and the allowed values."""
    if value is not None and value not in allowed:
        raise ConfigError(
            f"{where}: {key} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}."
        )


def find_config_file(start: Path | None = None) -> Path | None:
    """Find ``wove.toml``, or a ``pyproject.toml`` with ``[tool.wove]``, from ``start`` upwards.

    ``WOVE_CONFIG`` names a file explicitly.
    """
    explicit = os.environ.get("WOVE_CONFIG")
    if explicit:
        return Path(explicit)
    directory = (start or Path.cwd()).resolve()
    for folder in (directory, *directory.parents):
        candidate = folder / "wove.toml"
        if candidate.is_file():
            return candidate
        pyproject = folder / "pyproject.toml"
        if pyproject.is_file():
            try:
                if "wove" in tomllib.loads(pyproject.read_text("utf-8")).get("tool", {}):
                    return pyproject
            except (OSError, tomllib.TOMLDecodeError):
                continue
    return None


def load_config(path: str | Path | None = None, *, check_executors: bool = True) -> WoveConfig:
    """Load environments from ``path`` (or the file :func:`find_config_file` finds).

    Raises:
        ConfigError: the file is unreadable, not TOML, or a definition is invalid; the
            message names the file, the key and the fix.
    """
    file = Path(path) if path is not None else find_config_file()
    if file is None:
        return WoveConfig()
    try:
        document = tomllib.loads(file.read_text("utf-8"))
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read the Wove config: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from exc
    table = document.get("tool", {}).get("wove") if file.name == "pyproject.toml" else document
    if table is None:
        raise ConfigError(f"{file}: no [tool.wove] table. Add one, or put the settings in wove.toml.")
    unknown = sorted(set(table) - {"environments", "default_environment"})
    if unknown:
        raise ConfigError(f"{file}: unknown key(s) {', '.join(map(repr, unknown))}; expected default_environment and [environments.NAME] tables.")
    environments = table.get("environments", {})
    if not isinstance(environments, dict):
        raise ConfigError(f"{file}: 'environments' must be tables [environments.NAME].")
    for name, definition in environments.items():
        validate_definition(name, definition, source=str(file), check_executor=check_executors)
    default = table.get("default_environment")
    if default is not None and default not in environments and default != "local":
        raise ConfigError(
            f"{file}: default_environment = {default!r} names no environment; "
            f"defined: {', '.join(sorted(environments)) or '(none)'}."
        )
    return WoveConfig(environments=dict(environments), default_environment=default, path=file)
