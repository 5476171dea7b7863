"""Wove executor and worker that run tasks in a pool of subprocesses over JSON lines.

``StdioEnvironmentExecutor`` is registered as the ``stdio`` executor; the worker is
``python -m wove_executor_stdio``.
"""

from __future__ import annotations

from ._lines import STREAM_LIMIT, read_line
from .executor import StdioEnvironmentExecutor

__all__ = ["STREAM_LIMIT", "StdioEnvironmentExecutor", "read_line"]
