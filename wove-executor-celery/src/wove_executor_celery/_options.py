"""The celery executor's ``executor_config`` keys (:data:`CELERY_OPTIONS`) and defaults."""

from __future__ import annotations

import signal
from typing import Any

from wove.options import (
    BOOL,
    CALLBACK_OPTIONS,
    DICT,
    INVALID,
    NON_NEGATIVE_SECONDS,
    POSITIVE_SECONDS,
    STR,
    Kind,
    Option,
    OptionSpec,
)

__all__ = ["CELERY_OPTIONS", "DEFAULT_CONNECT_TIMEOUT", "DEFAULT_LOSS_GRACE_SECONDS", "TASK_NAME"]

#: The Celery task name payloads go to (Wove 2.x's default ``task_name``).
TASK_NAME = "wove.run_backend_payload"
#: Seconds a failed Celery task waits for the worker's own terminal callback before the
#: run is declared lost (the callback and the failure race).
DEFAULT_LOSS_GRACE_SECONDS = 1.0
#: Seconds to reach the broker (and a Redis result backend) at start.
DEFAULT_CONNECT_TIMEOUT = 5.0
#: Seconds after which a Celery task whose runs all ended another way is no longer watched.
FORGET_AFTER_SECONDS = 60.0
#: Lines of a failed Celery task's worker traceback quoted in the run's error.
WORKER_TRACEBACK_LINES = 12
_RESERVED_SEND_OPTIONS = ("task_id", "args", "kwargs", "ignore_result")
#: Celery states of a task that is on a worker (a repeated submission attaches to it).
IN_PROGRESS_STATES = ("STARTED", "RECEIVED", "RETRY")


def _send_task_options(value: Any) -> Any:
    if not isinstance(value, dict):
        return INVALID
    for reserved in _RESERVED_SEND_OPTIONS:
        if reserved in value:
            raise ValueError(f"it may not set {reserved!r}: Wove sets the task id (the run id, or the run's "
                             "delivery_idempotency_key), the payload argument and keeps the result")
    return value


def _celery_app(value: Any) -> Any:
    return value if callable(getattr(value, "send_task", None)) and hasattr(value, "conf") else INVALID


def _signal_name(value: Any) -> Any:
    if not isinstance(value, str):
        return INVALID
    name = value.upper() if value.upper().startswith("SIG") else f"SIG{value.upper()}"
    if name not in signal.Signals.__members__:
        raise ValueError("it is not a signal name of this platform")
    return name


#: The celery executor's ``executor_config`` keys (see :mod:`wove.options`): Wove 2.x's
#: keys, the adapter's own, and the backend callback and re-delivery keys.
CELERY_OPTIONS = OptionSpec("celery", [
    Option("app", Kind("a celery.Celery application", _celery_app),
           doc="an existing Celery app (instead of broker_url / result_backend)"),
    Option("broker_url", STR, doc="broker URL of the app Wove creates (amqp://..., redis://...)"),
    Option("result_backend", STR, aliases=("backend_url",),
           doc="result backend of the app Wove creates (redis://..., rpc://); outcomes come back through it "
               "when workers cannot reach the callback server"),
    Option("app_name", STR, "wove", "name of the app Wove creates"),
    Option("app_config", DICT, doc="Celery settings of the app Wove creates (broker_transport_options, ...)"),
    Option("task_name", STR, TASK_NAME, "the Celery task workers run payloads with"),
    Option("queue", STR, doc="Celery queue to send to (default: the app's default queue)"),
    Option("send_task_options", Kind("a dict of app.send_task keyword arguments", _send_task_options),
           doc="more app.send_task keyword arguments (priority, expires, routing_key...; not task_id/args)"),
    Option("terminate_on_cancel", BOOL, False,
           "cancel also terminates the pool process running the task (revoke(terminate=True); prefork pool)"),
    Option("terminate_signal", Kind("a signal name such as 'SIGTERM'", _signal_name), "SIGTERM",
           "the signal terminate_on_cancel sends"),
    Option("connect_timeout", POSITIVE_SECONDS, DEFAULT_CONNECT_TIMEOUT,
           "seconds to reach the broker and the result backend at start"),
    Option("loss_grace_seconds", NON_NEGATIVE_SECONDS, DEFAULT_LOSS_GRACE_SECONDS,
           "how long a failed Celery task waits for the worker's own terminal callback"),
    CALLBACK_OPTIONS,
])
