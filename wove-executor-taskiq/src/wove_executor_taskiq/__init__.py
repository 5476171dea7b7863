"""Wove backend adapter for taskiq: run Wove tasks on taskiq workers (taskiq-redis).

Use ``"executor": "taskiq"`` in an environment definition (see the README for the
``executor_config`` keys). Importing this package does not import taskiq; the workers'
side is :mod:`wove_executor_taskiq.worker`.
"""

from __future__ import annotations

from .adapter import DEFAULT_TASK_NAME, TASKIQ_OPTIONS, TaskiqAdapter, TaskiqSubmission, load_object
from .plugin import build_taskiq_executor

__all__ = ["DEFAULT_TASK_NAME", "TASKIQ_OPTIONS", "TaskiqAdapter", "TaskiqSubmission", "build_taskiq_executor",
           "load_object"]
