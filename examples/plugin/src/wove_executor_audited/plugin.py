"""The plugin module the entry point names: light (it imports only wove and the executor class)."""

from __future__ import annotations

from collections.abc import Callable

from wove import hookimpl

from .executor import AuditedExecutor


@hookimpl
def wove_register_executors(register: Callable[..., None]) -> None:
    register("audited", AuditedExecutor, description="in process, with an audit log of every run")
