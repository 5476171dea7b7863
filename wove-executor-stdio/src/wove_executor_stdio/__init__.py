"""Wove executor and worker that run tasks in a pool of subprocesses over JSON lines
(and binary frames, with a worker that announces them).

``StdioEnvironmentExecutor`` is registered as the ``stdio`` executor; the worker is
``python -m wove_executor_stdio``. :func:`read_line`, :func:`read_frame`,
:class:`FrameSplitter`, :class:`FrameReader` and :class:`PipeReader` read the stdio framing
(JSON lines and binary frames mixed); the last two read a binary frame's body straight into
its own buffer (one per segment above :data:`REUSE_BYTES`).
"""

from __future__ import annotations

from ._lines import (
           REUSE_BYTES,
           STREAM_LIMIT,
           Frame,
           FrameReader,
           FrameSplitter,
           Oversized,
           PipeReader,
           read_frame,
           read_line,
)
from .executor import StdioEnvironmentExecutor

__all__ = ["REUSE_BYTES", "STREAM_LIMIT", "Frame", "FrameReader", "FrameSplitter", "Oversized", "PipeReader", "StdioEnvironmentExecutor",
           "read_frame", "read_line"]
