"""The Celery worker side of Wove: the task ``wove.run_backend_payload``.

Start workers for the ``celery`` executor with this module's app::

    CELERY_BROKER_URL=redis://127.0.0.1:6379/0 CELERY_RESULT_BACKEND=redis://127.0.0.1:6379/1 \\
        celery -A wove_executor_celery.worker worker --loglevel=INFO

(``-b`` / ``--result-backend`` on the ``celery`` command work as well, and
``CELERY_CONFIG_MODULE=mysettings`` loads more Celery settings), or add the task to
your own Celery app with :func:`register_wove_task`::

    from celery import Celery
    from wove_executor_celery.worker import register_wove_task

    app = Celery("myapp", broker="redis://redis:6379/0", backend="redis://redis:6379/1")
    register_wove_task(app)

The task name is the one Wove 2.x clients send (``wove.run_backend_payload``), so a Wove
2.x client's ``celery`` environment runs on these workers unchanged.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from ._run import run_payload
from .adapter import TASK_NAME

__all__ = ["TASK_NAME", "TASK_OPTIONS", "app", "register_wove_task", "wove_task"]

#: Options of the Wove task (``register_wove_task`` keyword arguments override them).
#: ``acks_late``: a task whose worker died as a whole is delivered again by the broker, and
#: the task then applies the run's orphan policy; a pool process that died ends the task
#: with ``WorkerLostError`` (``reject_on_worker_lost`` stays off), which the submitting side
#: reads and re-delivers or reports, bounded by ``max_deliveries``. ``track_started`` lets
#: both sides tell a started run from a queued one. The result is the run's small JSON
#: status, so it is never ignored.
TASK_OPTIONS: dict[str, Any] = {
    "bind": True,
    "acks_late": True,
    "reject_on_worker_lost": False,
    "track_started": True,
    "ignore_result": False,
    "serializer": "json",
    "max_retries": 0,
}


def register_wove_task(celery_app: Celery, name: str = TASK_NAME, **options: Any) -> Any:
    """Add the Wove payload task to ``celery_app`` under ``name``; return the Celery task.

    Its workers then run what the ``celery`` executor sends (set the executor's
    ``task_name`` when ``name`` is not the default). ``options`` override
    :data:`TASK_OPTIONS` (``queue``, ``time_limit``, ``soft_time_limit``...).

    Raises:
        TypeError: ``celery_app`` is not a Celery application.
    """
    if not hasattr(celery_app, "task") or not hasattr(celery_app, "send_task"):
        raise TypeError(f"register_wove_task() needs a celery.Celery application, got {type(celery_app).__name__}.")
    task_options = {**TASK_OPTIONS, **options, "name": name}

    def run_backend_payload(self: Any, payload: dict[str, Any]) -> dict[str, Any]:
        return run_payload(payload, self.request, self.backend)

    run_backend_payload.__doc__ = f"Run one Wove backend payload (sent by Wove's celery executor as {name!r})."
    return celery_app.task(**task_options)(run_backend_payload)


#: A Celery app with the Wove task, for ``celery -A wove_executor_celery.worker worker``.
#: Its broker and result backend come from ``CELERY_BROKER_URL`` / ``CELERY_RESULT_BACKEND``
#: or the ``celery`` command's ``-b`` / ``--result-backend``; more settings from the module
#: named by ``CELERY_CONFIG_MODULE`` (a ``celeryconfig.py`` on the path), when set.
app = Celery("wove", set_as_current=False)
app.config_from_envvar("CELERY_CONFIG_MODULE", silent=True)
wove_task = register_wove_task(app)
