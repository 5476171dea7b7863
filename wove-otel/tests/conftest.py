"""The OpenTelemetry SDK with in-memory exporters, set once for the test process, and
``wove_otel.instrument()`` around each test that asks for ``otel``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry import metrics, trace
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import wove_otel


@dataclass
class Telemetry:
    """What the caller's process exported."""

    spans: InMemorySpanExporter
    reader: InMemoryMetricReader
    logs: InMemoryLogRecordExporter
    tracer_provider: TracerProvider
    logger_provider: LoggerProvider

    def finished(self, name: str | None = None) -> list[ReadableSpan]:
        return [span for span in self.spans.get_finished_spans() if name is None or span.name == name]

    def points(self, metric: str) -> list[Any]:
        """Every data point of ``metric`` (cumulative since the process started)."""
        data = self.reader.get_metrics_data()
        found: list[Any] = []
        for resource_metrics in data.resource_metrics if data is not None else ():
            for scope in resource_metrics.scope_metrics:
                for item in scope.metrics:
                    if item.name == metric:
                        found.extend(item.data.data_points)
        return found


_TELEMETRY: Telemetry | None = None


def _telemetry() -> Telemetry:
    global _TELEMETRY
    if _TELEMETRY is None:
        resource = Resource.create({"service.name": "wove-otel-tests"})
        spans = InMemorySpanExporter()
        tracer_provider = TracerProvider(resource=resource)
        tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
        trace.set_tracer_provider(tracer_provider)
        reader = InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=[reader]))
        logs = InMemoryLogRecordExporter()
        logger_provider = LoggerProvider(resource=resource)
        logger_provider.add_log_record_processor(SimpleLogRecordProcessor(logs))
        _TELEMETRY = Telemetry(spans, reader, logs, tracer_provider, logger_provider)
    return _TELEMETRY


@pytest.fixture
def otel() -> Iterator[Telemetry]:
    """The SDK (global providers, in-memory exporters) with Wove instrumented for one test."""
    telemetry = _telemetry()
    telemetry.spans.clear()
    telemetry.logs.clear()
    wove_otel.instrument()
    try:
        yield telemetry
    finally:
        wove_otel.uninstrument()
