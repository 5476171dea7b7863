"""Executor plugin discovery through the ``wove.executors`` entry point group.

Resolution loads the entry point named like the executor first (its import errors
surface as they are), then the other plugin modules, so that a name two installed plugins
claim is an error naming both rather than a silent pick of the first. Plugin modules are
light by contract (they import no transport library), so loading them all is cheap; a
plugin that fails to import or to register is recorded, logged and skipped: it does not
affect environments that do not use it.

``WOVE_DISABLE_PLUGINS=a,b`` skips the named entry points; ``WOVE_LOAD_PLUGINS=a,b``
loads only those. A name in either that no installed plugin has is logged as a warning.
"""

from __future__ import annotations

import difflib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any

import pluggy

from . import hookspecs
from .errors import ConfigError

if TYPE_CHECKING:
    from .executor import EnvironmentExecutor

__all__ = [
    "ENTRY_POINT_GROUP",
    "KNOWN_DISTRIBUTIONS",
    "KNOWN_SERVICES",
    "PLANNED_EXECUTORS",
    "WOVE_PLUGIN_API",
    "ExecutorInfo",
    "PluginInfo",
    "Registry",
    "build_executor_from_name",
    "get_registry",
    "install_hint",
]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "wove.executors"
WOVE_PLUGIN_API = 1

#: ``wove worker NAME`` services provided by distributions of this project, for install hints.
KNOWN_SERVICES = {
    "http": "wove-executor-http",
    "grpc": "wove-executor-grpc",
    "websocket": "wove-executor-ws",
}

#: Executor names provided by distributions of this project, for install hints.
KNOWN_DISTRIBUTIONS = {
    "stdio": "wove-executor-stdio",
    "http": "wove-executor-http",
    "https": "wove-executor-http",
    "grpc": "wove-executor-grpc",
    "websocket": "wove-executor-ws",
    "ws": "wove-executor-ws",
    "dask": "wove-executor-dask",
    "ray": "wove-executor-ray",
    "celery": "wove-executor-celery",
    "rq": "wove-executor-rq",
    "arq": "wove-executor-arq",
    "taskiq": "wove-executor-taskiq",
    "temporal": "wove-executor-temporal",
    "slurm": "wove-executor-slurm",
}

#: Wove 2.x engine names this project has no distribution for yet, and why.
PLANNED_EXECUTORS = {
    "kubernetes_jobs": "no distribution provides it yet (it waits for a Kubernetes cluster the project can test "
                       "against; docs/engines/index.md says how it would be built)",
    "aws_batch": "no distribution provides it yet (it waits for an AWS Batch queue the project can test against; "
                 "docs/engines/index.md says how it would be built)",
}


#: Distributions of this project that need only wove-core (the engine adapters also need wove-backend).
_TRANSPORT_DISTRIBUTIONS = frozenset({"wove-executor-stdio", "wove-executor-http", "wove-executor-grpc",
                                      "wove-executor-ws", "wove-otel"})


def install_hint(distribution: str) -> str:
    """How to install ``distribution``: from the package index, or from a checkout of this project.

    From a checkout, pip is given the project's own distributions that ``distribution``
    depends on too (no package index has them yet, so pip could not find them there).
    """
    local = [] if distribution == "wove-core" else ["wove-core"]
    if distribution.startswith("wove-executor-") and distribution not in _TRANSPORT_DISTRIBUTIONS:
        local.append("wove-backend")
    paths = " ".join(f"./{name}" for name in [*local, distribution])
    return (f"pip install {distribution} (from a checkout of this project: pip install {paths}, "
            "or uv sync --all-packages; see docs/installing.md)")


@dataclass
class ExecutorInfo:
    """One registered executor name."""

    name: str
    factory: Callable[[], EnvironmentExecutor]
    plugin: str
    distribution: str
    version: str
    description: str = ""
    alias_of: str | None = None


@dataclass
class PluginInfo:
    """One entry point of the ``wove.executors`` group."""

    name: str
    value: str
    distribution: str
    version: str
    status: str = "not loaded"
    executors: list[str] = field(default_factory=list)


class Registry:
    """Loads plugins on demand and maps executor names to factories."""

    def __init__(self, entry_points: list[metadata.EntryPoint] | None = None) -> None:
        self.manager = pluggy.PluginManager(hookspecs.PROJECT)
        self.manager.add_hookspecs(hookspecs)
        self._lock = threading.RLock()
        self._executors: dict[str, ExecutorInfo] = {}
        self._plugins: dict[str, PluginInfo] = {}
        self._entry_points: dict[str, metadata.EntryPoint] = {}
        self._conflicts: dict[str, list[ExecutorInfo]] = {}
        self._warned: set[tuple[str, str]] = set()
        self._all_loaded = False
        for ep in entry_points if entry_points is not None else _group_entry_points():
            if ep.name in self._entry_points:
                continue
            dist = getattr(ep, "dist", None)
            self._entry_points[ep.name] = ep
            self._plugins[ep.name] = PluginInfo(
                name=ep.name,
                value=ep.value,
                distribution=dist.metadata["Name"] if dist is not None else "?",
                version=dist.version if dist is not None else "?",
            )

    # -- loading ---------------------------------------------------------------
    def _allowed(self, name: str) -> bool:
        disabled = _env_list("WOVE_DISABLE_PLUGINS")
        only = _env_list("WOVE_LOAD_PLUGINS")
        self._warn_unknown_plugin_names("WOVE_DISABLE_PLUGINS", disabled)
        self._warn_unknown_plugin_names("WOVE_LOAD_PLUGINS", only)
        return name not in disabled and (not only or name in only)

    def _warn_unknown_plugin_names(self, variable: str, names: set[str]) -> None:
        known = sorted(self._entry_points)
        for unknown in sorted(names - set(known)):
            if (variable, unknown) in self._warned:
                continue
            self._warned.add((variable, unknown))
            close = difflib.get_close_matches(unknown, known, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            logger.warning(
                "%s names plugin %r, but no installed plugin has that name; installed plugins: %s.%s "
                "(Plugin names are the wove.executors entry point names `wove executors` lists.)",
                variable, unknown, ", ".join(known) or "(none)", hint,
            )

    def _load(self, name: str, *, strict: bool = True) -> None:
        info = self._plugins[name]
        if info.status != "not loaded":
            return
        if not self._allowed(name):
            info.status = "disabled"
            return
        try:
            plugin = self._entry_points[name].load()
        except Exception as exc:
            info.status = f"failed to import: {type(exc).__name__}: {exc}"
            logger.warning(
                "Wove plugin %r from %s %s failed to import and is skipped: %s",
                name, info.distribution, info.version, exc,
            )
            return
        try:
            self._register(plugin, name=name, distribution=info.distribution, version=info.version,
                           strict=False)
        except Exception as exc:
            if strict:
                raise
            info.status = f"failed to register: {type(exc).__name__}: {exc}"
            logger.warning(
                "Wove plugin %r from %s %s failed to register its executors and is skipped: %s",
                name, info.distribution, info.version, exc,
            )

    def register_plugin(
        self,
        plugin: Any,
        *,
        name: str,
        distribution: str = "?",
        version: str = "?",
    ) -> None:
        """Register a plugin object directly (tests, applications embedding a plugin).

        Raises:
            ConfigError: the plugin registers a name another plugin already registered,
                or was built for another plugin API version.
        """
        self._register(plugin, name=name, distribution=distribution, version=version, strict=True)

    def _register(self, plugin: Any, *, name: str, distribution: str, version: str, strict: bool) -> None:
        # strict: a clash with an already registered name raises (and registers nothing).
        # Otherwise (entry points) the clashing name is recorded in self._conflicts, so
        # resolving it raises an error naming both plugins, and the plugin's other names work.
        with self._lock:
            info = self._plugins.setdefault(
                name, PluginInfo(name=name, value=repr(plugin), distribution=distribution, version=version)
            )
            if self.manager.is_registered(plugin):
                return
            self.manager.register(plugin, name=name)
            registered: dict[str, ExecutorInfo] = {}
            clashes: list[ExecutorInfo] = []

            def register(
                executor_name: str,
                factory: Callable[[], EnvironmentExecutor],
                *,
                aliases: tuple[str, ...] | list[str] = (),
                description: str = "",
                api: int = WOVE_PLUGIN_API,
            ) -> None:
                if api != WOVE_PLUGIN_API:
                    raise ConfigError(
                        f"Plugin '{name}' ({distribution} {version}) was built for Wove plugin API "
                        f"{api}, but the installed wove-core provides API {WOVE_PLUGIN_API}. "
                        f"Install a version of {distribution} made for this wove-core."
                    )
                if not isinstance(executor_name, str) or not executor_name:
                    raise ConfigError(f"Plugin '{name}' registered an executor with an invalid name {executor_name!r}")
                if not callable(factory):
                    raise ConfigError(
                        f"Plugin '{name}' registered executor '{executor_name}' with a non-callable "
                        f"factory {factory!r}; register a class or a zero-argument function."
                    )
                for alias, alias_of in [(executor_name, None), *((a, executor_name) for a in aliases)]:
                    entry = ExecutorInfo(
                        name=alias, factory=factory, plugin=name, distribution=distribution,
                        version=version, description=description, alias_of=alias_of,
                    )
                    existing = registered.get(alias)
                    if existing is None and strict:
                        existing = self._executors.get(alias) or next(iter(self._conflicts.get(alias, ())), None)
                    if existing is not None:
                        raise ConfigError(_duplicate_message(alias, [existing, entry]))
                    if alias in self._executors or alias in self._conflicts:
                        clashes.append(entry)
                    else:
                        registered[alias] = entry

            try:
                for impl in self.manager.hook.wove_register_executors.get_hookimpls():
                    if impl.plugin is plugin:
                        impl.function(register=register)
            except Exception:
                self.manager.unregister(plugin)
                info.status = "error"
                raise
            self._executors.update(registered)
            for entry in clashes:
                first = self._executors.pop(entry.name, None)
                self._conflicts.setdefault(entry.name, [first] if first is not None else []).append(entry)
                logger.warning("%s", _duplicate_message(entry.name, self._conflicts[entry.name]))
            info.status = "loaded"
            info.executors = sorted([*registered, *(entry.name for entry in clashes)])

    def _load_everything(self) -> None:
        with self._lock:
            if self._all_loaded:
                return
            for name in list(self._entry_points):
                self._load(name, strict=False)
            self._all_loaded = True

    def load_all(self) -> None:
        """Load every allowed plugin (for listings and the non-executor hooks).

        Raises:
            ConfigError: two plugins register one executor name (the message names both).
        """
        self._load_everything()
        for name in sorted(self._conflicts):
            raise ConfigError(_duplicate_message(name, self._conflicts[name]))

    def lookup(self, name: str) -> ExecutorInfo | None:
        """Return the executor registered as ``name``, loading plugins as needed.

        The entry point named ``name`` is loaded first (its errors propagate), then every
        other allowed plugin, so that a second claim on the name is found.

        Raises:
            ConfigError: two installed plugins register ``name`` (the message names both).
        """
        with self._lock:
            if name in self._entry_points:
                self._load(name)
            self._load_everything()
            if name in self._conflicts:
                raise ConfigError(_duplicate_message(name, self._conflicts[name]))
            return self._executors.get(name)

    def conflicts(self) -> dict[str, list[ExecutorInfo]]:
        """Executor names that more than one plugin registers (none of them is used)."""
        self._load_everything()
        return {name: list(infos) for name, infos in sorted(self._conflicts.items())}

    def executors(self) -> list[ExecutorInfo]:
        """Every usable registered name (names claimed twice are in :meth:`conflicts`)."""
        self._load_everything()
        return sorted(self._executors.values(), key=lambda info: info.name)

    def plugins(self) -> list[PluginInfo]:
        self._load_everything()
        return sorted(self._plugins.values(), key=lambda info: info.name)

    def build(self, name: str, *, environment: str | None = None) -> EnvironmentExecutor:
        """Build a fresh executor registered as ``name``.

        Raises:
            ValueError: the name is unknown; the message lists the installed names, the
                closest match and, for this project's transports, the install command.
        """
        info = self.lookup(name)
        if info is None:
            raise ValueError(self.unknown_message(name, environment=environment))
        executor = info.factory()
        from .executor import EnvironmentExecutor

        if not isinstance(executor, EnvironmentExecutor):
            raise ConfigError(
                f"Executor factory for '{name}' from plugin '{info.plugin}' ({info.distribution}) "
                f"returned {type(executor).__name__}, not an EnvironmentExecutor."
            )
        return executor

    def unknown_message(self, name: str, *, environment: str | None = None) -> str:
        known = sorted(self._executors)
        where = f" in environment '{environment}'" if environment else ""
        message = f"Unknown executor {name!r}{where}. Installed executors: {', '.join(known) or '(none)'}."
        dist = KNOWN_DISTRIBUTIONS.get(name)
        if dist is not None:
            message += f" '{name}' is provided by {dist}: {install_hint(dist)}"
        elif name in PLANNED_EXECUTORS:
            message += f" '{name}' is a Wove 2.x engine name: {PLANNED_EXECUTORS[name]}."
        else:
            close = difflib.get_close_matches(name, known + list(KNOWN_DISTRIBUTIONS), n=1)
            if close:
                message += f" Did you mean '{close[0]}'?"
        failed = [p for p in self._plugins.values() if p.status.startswith("failed")]
        for plugin in failed:
            message += f" (Plugin '{plugin.name}' from {plugin.distribution} {plugin.status}.)"
        return message


def _duplicate_message(name: str, claims: list[ExecutorInfo]) -> str:
    who = [f"by plugin '{c.plugin}' ({c.distribution} {c.version})" for c in claims]
    times = "twice" if len(claims) == 2 else f"{len(claims)} times"
    return (
        f"Executor name '{name}' is registered {times}: {', '.join(who[:-1])} and {who[-1]}. "
        f"Uninstall one of them, or disable one with WOVE_DISABLE_PLUGINS={claims[-1].plugin}."
    )


def _env_list(variable: str) -> set[str]:
    return {item.strip() for item in os.environ.get(variable, "").split(",") if item.strip()}


def _group_entry_points() -> list[metadata.EntryPoint]:
    return list(metadata.entry_points(group=ENTRY_POINT_GROUP))


_registry: Registry | None = None
_registry_lock = threading.Lock()


def get_registry() -> Registry:
    """The process-wide registry, built from the installed entry points on first use."""
    global _registry
    with _registry_lock:
        if _registry is None:
            _registry = Registry()
        return _registry


def reset_registry() -> None:
    """Forget loaded plugins (tests; after installing a distribution at run time)."""
    global _registry
    with _registry_lock:
        _registry = None


def build_executor_from_name(name: str) -> EnvironmentExecutor:
    """Build a fresh executor registered under ``name`` by an installed plugin.

    Raises:
        ValueError: unknown name (lists installed names and the install command).
    """
    if not isinstance(name, str):
        raise TypeError(f"Executor name must be a string, got {type(name).__name__}")
    return get_registry().build(name)
