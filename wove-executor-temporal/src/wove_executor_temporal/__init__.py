"""Wove backend adapter for Temporal: each task runs as a Temporal workflow.

Use ``"executor": "temporal"`` in an environment definition (see the README for the
``executor_config`` keys) and run ``python -m wove_executor_temporal.worker`` where the
tasks should execute. Importing this package imports neither temporalio nor Wove's
backend machinery (Temporal's workflow sandbox imports it again for every workflow
definition): the names below load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._names import (
    ACTIVITY_NAME,
    DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_START_TO_CLOSE_TIMEOUT,
    WORKFLOW_NAME,
)

if TYPE_CHECKING:
    from .activity import PayloadActivity, run_wove_payload
    from .adapter import TEMPORAL_OPTIONS, TemporalAdapter, TemporalSubmission, workflow_id
    from .plugin import build_temporal_executor
    from .worker import build_worker
    from .workflow import WovePayloadWorkflow

__all__ = [
    "ACTIVITY_NAME",
    "DEFAULT_HEARTBEAT_TIMEOUT",
    "DEFAULT_START_TO_CLOSE_TIMEOUT",
    "TEMPORAL_OPTIONS",
    "WORKFLOW_NAME",
    "PayloadActivity",
    "TemporalAdapter",
    "TemporalSubmission",
    "WovePayloadWorkflow",
    "build_temporal_executor",
    "build_worker",
    "run_wove_payload",
    "workflow_id",
]

_LAZY = {
    "PayloadActivity": "activity", "run_wove_payload": "activity",
    "TEMPORAL_OPTIONS": "adapter", "TemporalAdapter": "adapter", "TemporalSubmission": "adapter",
    "workflow_id": "adapter", "build_temporal_executor": "plugin", "build_worker": "worker",
    "WovePayloadWorkflow": "workflow",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'wove_executor_temporal' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
