"""Registers the ``local`` executor, through the same entry point as any plugin."""

from __future__ import annotations

from collections.abc import Callable

from .hookspecs import hookimpl


@hookimpl
def wove_register_executors(register: Callable[..., None]) -> None:
    from .local import LocalEnvironmentExecutor

    register("local", LocalEnvironmentExecutor, description="in-process: async on the loop, sync in a thread pool")


@hookimpl
def wove_demo_environments(register: Callable[..., None]) -> None:
    import contextlib

    @contextlib.asynccontextmanager
    async def local():  # type: ignore[no-untyped-def]
        yield {"executor": "local"}

    register("local", local)
