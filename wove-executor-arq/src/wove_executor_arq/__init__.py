"""Wove backend adapter for arq: run Wove tasks as jobs on arq workers (asyncio, Redis).

Use ``"executor": "arq"`` in an environment definition (see the README for the
``executor_config`` keys). Importing this package does not import arq; the workers' side
is :mod:`wove_executor_arq.worker`.
"""

from __future__ import annotations

from .adapter import ALIVE_KEY_PREFIX, ARQ_OPTIONS, DEFAULT_FUNCTION_NAME, ARQAdapter, ARQSubmission
from .plugin import build_arq_executor

__all__ = ["ALIVE_KEY_PREFIX", "ARQ_OPTIONS", "DEFAULT_FUNCTION_NAME", "ARQAdapter", "ARQSubmission",
           "build_arq_executor"]
