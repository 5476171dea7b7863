"""Executor plugin discovery through the ``wove.executors`` entry point group.

Resolution is lazy: ``build_executor_from_name("grpc")`` loads the entry point named
``grpc`` first and the other plugins only when the name is not registered there, so one
broken or slow plugin does not affect environments that do not use it.

``WOVE_DISABLE_PLUGINS=a,b`` skips the named entry points; ``WOVE_LOAD_PLUGINS=a,b``
loads only those.
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
    "WOVE_PLUGIN_API",
    "ExecutorInfo",
    "PluginInfo",
    "Registry",
    "build_executor_from_name",
    "get_registry",
]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "wove.executors"
WOVE_PLUGIN_API = 1

#: Executor names provided by distributions of this project, for install hints.
KNOWN_DISTRIBUTIONS = {
    "stdio": "wove-executor-stdio",
    "http": "wove-executor-http",
    "https": "wove-executor-http",
    "grpc": "wove-executor-grpc",
    "websocket": "wove-executor-ws",
    "ws": "wove-executor-ws",
    "dask": "wove-executor-dask",
}


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
        return name not in disabled and (not only or name in only)

    def _load(self, name: str) -> None:
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
        self.register_plugin(plugin, name=name, distribution=info.distribution, version=info.version)

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
        with self._lock:
            info = self._plugins.setdefault(
                name, PluginInfo(name=name, value=repr(plugin), distribution=distribution, version=version)
            )
            if self.manager.is_registered(plugin):
                return
            self.manager.register(plugin, name=name)
            registered: dict[str, ExecutorInfo] = {}

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
                    existing = self._executors.get(alias) or registered.get(alias)
                    if existing is not None:
                        raise ConfigError(
                            f"Executor name '{alias}' is registered twice: by plugin '{existing.plugin}' "
                            f"({existing.distribution}) and by plugin '{name}' ({distribution}). "
                            f"Uninstall one of them, or disable one with WOVE_DISABLE_PLUGINS={name}."
                        )
                    registered[alias] = ExecutorInfo(
                        name=alias, factory=factory, plugin=name, distribution=distribution,
                        version=version, description=description, alias_of=alias_of,
                    )

            try:
                for impl in self.manager.hook.wove_register_executors.get_hookimpls():
                    if impl.plugin is plugin:
                        impl.function(register=register)
            except Exception:
                self.manager.unregister(plugin)
                info.status = "error"
                raise
            self._executors.update(registered)
            info.status = "loaded"
            info.executors = sorted(registered)

    def load_all(self) -> None:
        """Load every allowed plugin (for listings and the non-executor hooks)."""
        with self._lock:
            if self._all_loaded:
                return
            for name in list(self._entry_points):
                self._load(name)
            self._all_loaded = True

    # -- queries ---------------------------------------------------------------
    def lookup(self, name: str) -> ExecutorInfo | None:
        """Return the executor registered as ``name``, loading plugins as needed."""
        with self._lock:
            if name in self._executors:
                return self._executors[name]
            if name in self._entry_points:
                self._load(name)
                if name in self._executors:
                    return self._executors[name]
            self.load_all()
            return self._executors.get(name)

    def executors(self) -> list[ExecutorInfo]:
        self.load_all()
        return sorted(self._executors.values(), key=lambda info: info.name)

    def plugins(self) -> list[PluginInfo]:
        self.load_all()
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
            message += f" '{name}' is provided by {dist}: pip install {dist}"
        else:
            close = difflib.get_close_matches(name, known + list(KNOWN_DISTRIBUTIONS), n=1)
            if close:
                message += f" Did you mean '{close[0]}'?"
        failed = [p for p in self._plugins.values() if p.status.startswith("failed")]
        for plugin in failed:
            message += f" (Plugin '{plugin.name}' from {plugin.distribution} {plugin.status}.)"
        return message


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
