"""Wove executor and worker that run tasks in a pool of subprocesses over JSON lines
(and binary frames, with a worker that announces them).

``StdioEnvironmentExecutor`` is registered as the ``stdio`` executor; the worker is
``python -m wove_executor_stdio``. :func:`read_line`, :func:`read_frame` and
:class:`FrameSplitter` read the stdio framing (JSON lines and binary frames mixed).
"""

from __future__ import annotations

from ._lines import STREAM_LIMIT, FrameSplitter, Oversized, read_frame, read_line
from .executor import StdioEnvironmentExecutor

__all__ = ["STREAM_LIMIT", "FrameSplitter", "Oversized", "StdioEnvironmentExecutor", "read_frame", "read_line"]
