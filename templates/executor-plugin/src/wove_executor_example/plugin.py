"""Registers the ``example`` executor (light: import your transport library in start())."""

from __future__ import annotations

from collections.abc import Callable

from wove import hookimpl

from .executor import ExampleEnvironmentExecutor


@hookimpl
def wove_register_executors(register: Callable[..., None]) -> None:
    register("example", ExampleEnvironmentExecutor, description="example: frames through an in-process queue")
