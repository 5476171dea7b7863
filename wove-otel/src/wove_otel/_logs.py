"""Log correlation: every ``logging.LogRecord`` carries the current trace and span ids.

The attribute names are those of ``opentelemetry-instrumentation-logging``
(``otelTraceID``, ``otelSpanID``, ``otelTraceSampled``, ``otelServiceName``), so a format
string written for it works here (``%(otelTraceID)s``) and either may be installed. Records
exported through the SDK's ``LoggingHandler`` get their trace context from OpenTelemetry
itself; this factory is for the records written by ordinary handlers (files, stderr).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from opentelemetry import trace

__all__ = ["LOG_FORMAT", "install_log_correlation", "uninstall_log_correlation"]

#: a format showing the ids: ``logging.basicConfig(format=wove_otel.LOG_FORMAT)``
LOG_FORMAT = ("%(asctime)s %(levelname)s [%(name)s] [trace_id=%(otelTraceID)s span_id=%(otelSpanID)s] "
              "%(message)s")

_lock = threading.Lock()
_previous: Callable[..., logging.LogRecord] | None = None
_factory: Callable[..., logging.LogRecord] | None = None
#: the installed factory's switch: cleared when it is uninstalled
_active: list[bool] | None = None


def _service_name(provider: Any) -> str:
    resource = getattr(provider, "resource", None)
    attributes = getattr(resource, "attributes", None) or {}
    return str(attributes.get("service.name", ""))


def install_log_correlation(tracer_provider: trace.TracerProvider | None = None) -> None:
    """Wrap the log record factory so records carry the ids of the current span ("0" without one)."""
    global _previous, _factory, _active
    with _lock:
        if _factory is not None:
            return
        previous = logging.getLogRecordFactory()
        provider = tracer_provider
        active = [True]

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            if not active[0]:  # uninstalled while another factory wrapped this one: pass records through
                return record
            context = trace.get_current_span().get_span_context()
            if context.is_valid:
                record.otelTraceID = format(context.trace_id, "032x")
                record.otelSpanID = format(context.span_id, "016x")
                record.otelTraceSampled = context.trace_flags.sampled
            else:
                record.otelTraceID = "0"
                record.otelSpanID = "0"
                record.otelTraceSampled = False
            record.otelServiceName = _service_name(provider or trace.get_tracer_provider())
            return record

        _previous, _factory, _active = previous, factory, active
        logging.setLogRecordFactory(factory)


def uninstall_log_correlation() -> None:
    """Put back the factory that was there before; when another library wrapped ours since
    (Ray does when it is imported), ours stays in that chain but adds nothing any more."""
    global _previous, _factory, _active
    with _lock:
        if _factory is None:
            return
        if _active is not None:
            _active[0] = False
        if logging.getLogRecordFactory() is _factory and _previous is not None:
            logging.setLogRecordFactory(_previous)
        _previous = _factory = _active = None
