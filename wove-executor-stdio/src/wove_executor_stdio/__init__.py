"""Wove executor and worker that run tasks in a pool of subprocesses over JSON lines.

``StdioEnvironmentExecutor`` is registered as the ``stdio`` executor; the worker is
``python -m wove_executor_stdio``.
"""

from __future__ import annotations

from .executor import StdioEnvironmentExecutor

__all__ = ["StdioEnvironmentExecutor"]
