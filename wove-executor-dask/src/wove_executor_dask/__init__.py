"""Wove backend adapter for Dask distributed: run Wove tasks on a Dask cluster.

Use ``"executor": "dask"`` in an environment definition (see the README for the
``executor_config`` keys). Importing this package does not import Dask.
"""

from __future__ import annotations

from .adapter import (
    DASK_OPTIONS,
    DEFAULT_CONNECT_TIMEOUT,
    DaskAdapter,
    DaskSubmission,
    MainGuardError,
)
from .plugin import build_dask_executor

__all__ = ["DASK_OPTIONS", "DEFAULT_CONNECT_TIMEOUT", "DaskAdapter", "DaskSubmission", "MainGuardError", "build_dask_executor"]
