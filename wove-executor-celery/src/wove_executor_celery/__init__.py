"""Wove backend adapter for Celery: run Wove tasks on Celery workers (RabbitMQ or Redis).

Use ``"executor": "celery"`` in an environment definition (see the README for the
``executor_config`` keys) and start workers with ``celery -A wove_executor_celery.worker
worker`` or :func:`register_wove_task` in your own app. Importing this package does not
import Celery.
"""

from __future__ import annotations

from typing import Any

from .adapter import (
    CELERY_OPTIONS,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_LOSS_GRACE_SECONDS,
    TASK_NAME,
    CeleryAdapter,
    CelerySubmission,
    celery_task_id,
)
from .plugin import build_celery_executor

__all__ = [
    "CELERY_OPTIONS",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_LOSS_GRACE_SECONDS",
    "TASK_NAME",
    "CeleryAdapter",
    "CelerySubmission",
    "build_celery_executor",
    "celery_task_id",
    "register_wove_task",
]


def register_wove_task(celery_app: Any, name: str = TASK_NAME, **options: Any) -> Any:
    """Add the Wove payload task to your Celery app (see :func:`wove_executor_celery.worker.register_wove_task`).

    Raises:
        TypeError: ``celery_app`` is not a Celery application.
    """
    from .worker import register_wove_task as register

    return register(celery_app, name, **options)
