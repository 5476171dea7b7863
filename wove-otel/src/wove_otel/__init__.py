"""OpenTelemetry traces, metrics and log correlation for Wove runs, on the caller and on the worker.

Configure the OpenTelemetry SDK as usual, then::

    import wove_otel
    wove_otel.instrument()

(or run the program under ``opentelemetry-instrument``: the ``opentelemetry_instrumentor``
entry point ``wove`` calls :class:`WoveInstrumentor` for you). Every run then gets a client
span (``wove/<task>``, kind CLIENT; ``send <environment>``, kind PRODUCER, for the
distributed engines), every execution on a worker a child span (``wove/<task>``, SERVER;
``process <task>``, CONSUMER), the W3C trace context travels in the ``run_task`` frame and in
backend payloads, the metrics named in :mod:`wove_otel.names` are recorded, and log records carry
``otelTraceID`` / ``otelSpanID``. ``docs/observability.md`` is the walk-through.
"""

from __future__ import annotations

import threading
from collections.abc import Collection
from importlib import metadata
from typing import Any

from opentelemetry import metrics, trace

from wove.observe import add_observer, remove_observer

from ._logs import LOG_FORMAT, install_log_correlation, uninstall_log_correlation
from ._observer import WoveObserver

__all__ = [
    "LOG_FORMAT",
    "WoveInstrumentor",
    "WoveObserver",
    "__version__",
    "instrument",
    "is_instrumented",
    "uninstrument",
]

try:
    __version__ = metadata.version("wove-otel")
except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

_lock = threading.Lock()
_observer: WoveObserver | None = None


def instrument(*, tracer_provider: trace.TracerProvider | None = None,
               meter_provider: metrics.MeterProvider | None = None, log_correlation: bool = True) -> WoveObserver:
    """Start tracing and measuring Wove runs in this process (caller and worker sides).

    Call it once the SDK is configured, or before: without explicit providers the global
    ones are used, and spans started before the SDK is set up are simply not recorded.
    Calling it again returns the installed observer (uninstrument first to change the
    providers).

    Args:
        tracer_provider: where spans go (default: the global tracer provider).
        meter_provider: where metrics go (default: the global meter provider).
        log_correlation: add ``otelTraceID``, ``otelSpanID``, ``otelTraceSampled`` and
            ``otelServiceName`` to every log record (the record factory of
            ``opentelemetry-instrumentation-logging``, without that dependency).

    Raises:
        TypeError: a provider is not an OpenTelemetry ``TracerProvider`` / ``MeterProvider``.
    """
    global _observer
    if tracer_provider is not None and not isinstance(tracer_provider, trace.TracerProvider):
        raise TypeError(f"wove_otel.instrument(tracer_provider=...) needs an opentelemetry TracerProvider, "
                        f"got {type(tracer_provider).__name__}.")
    if meter_provider is not None and not isinstance(meter_provider, metrics.MeterProvider):
        raise TypeError(f"wove_otel.instrument(meter_provider=...) needs an opentelemetry MeterProvider, "
                        f"got {type(meter_provider).__name__}.")
    with _lock:
        if _observer is None:
            _observer = WoveObserver(tracer_provider=tracer_provider, meter_provider=meter_provider)
            add_observer(_observer)
            if log_correlation:
                install_log_correlation(tracer_provider)
        return _observer


def uninstrument() -> None:
    """Stop: remove the observer and the log record factory (runs in flight end unrecorded)."""
    global _observer
    with _lock:
        if _observer is not None:
            remove_observer(_observer)
            _observer = None
        uninstall_log_correlation()


def is_instrumented() -> bool:
    """True between :func:`instrument` and :func:`uninstrument`."""
    return _observer is not None


class WoveInstrumentor:
    """The ``opentelemetry-instrument`` entry point (``opentelemetry_instrumentor`` group,
    name ``wove``), shaped like ``opentelemetry-instrumentation``'s ``BaseInstrumentor``
    without depending on it: ``WoveInstrumentor().instrument(**kwargs)`` is :func:`instrument`."""

    def instrumentation_dependencies(self) -> Collection[str]:
        """Libraries this instrumentation needs (``wove-core`` is a dependency already)."""
        return ()

    def instrument(self, **kwargs: Any) -> None:
        """:func:`instrument` with ``tracer_provider``, ``meter_provider`` and
        ``log_correlation`` taken from ``kwargs`` (others, such as the auto-instrumentation's
        ``raise_exception_on_conflict``, are ignored)."""
        instrument(tracer_provider=kwargs.get("tracer_provider"), meter_provider=kwargs.get("meter_provider"),
                   log_correlation=kwargs.get("log_correlation", True))

    def uninstrument(self, **kwargs: Any) -> None:
        """:func:`uninstrument`."""
        uninstrument()

    @property
    def is_instrumented_by_opentelemetry(self) -> bool:
        """True while Wove is instrumented."""
        return is_instrumented()
