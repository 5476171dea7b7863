"""Wove backend adapter for Slurm: each task runs as a Slurm batch job.

Use ``"executor": "slurm"`` in an environment definition (see the README for the
``executor_config`` keys); jobs run ``python -m wove_executor_slurm.job <payload file>``.
Importing this package imports nothing else: a job process (``wove_executor_slurm.job``)
loads only what it runs, and the names below load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .adapter import (
        DEFAULT_COMMAND,
        SLURM_OPTIONS,
        TERMINAL_STATES,
        SlurmAdapter,
        SlurmJob,
        SlurmSubmission,
        job_name,
    )
    from .job import STATUS_MARKER, parse_status
    from .plugin import build_slurm_executor

__all__ = [
    "DEFAULT_COMMAND",
    "SLURM_OPTIONS",
    "STATUS_MARKER",
    "TERMINAL_STATES",
    "SlurmAdapter",
    "SlurmJob",
    "SlurmSubmission",
    "build_slurm_executor",
    "job_name",
    "parse_status",
]

_LAZY = {
    "DEFAULT_COMMAND": "adapter", "SLURM_OPTIONS": "adapter", "TERMINAL_STATES": "adapter",
    "SlurmAdapter": "adapter", "SlurmJob": "adapter", "SlurmSubmission": "adapter", "job_name": "adapter",
    "STATUS_MARKER": "job", "parse_status": "job", "build_slurm_executor": "plugin",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'wove_executor_slurm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
