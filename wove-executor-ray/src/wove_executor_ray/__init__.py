"""Wove backend adapter for Ray: run Wove tasks as Ray tasks on a Ray cluster.

Use ``"executor": "ray"`` in an environment definition (see the README for the
``executor_config`` keys). Importing this package does not import Ray.
"""

from __future__ import annotations

from .adapter import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_LOSS_GRACE_SECONDS,
    LEDGER_NAME,
    RAY_OPTIONS,
    RayAdapter,
    RaySubmission,
)
from .plugin import build_ray_executor

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_LOSS_GRACE_SECONDS",
    "LEDGER_NAME",
    "RAY_OPTIONS",
    "RayAdapter",
    "RaySubmission",
    "build_ray_executor",
]
