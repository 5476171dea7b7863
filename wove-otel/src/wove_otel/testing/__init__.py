"""Span files: see the spans of worker processes (tests, debugging) without a collector.

A worker process started under the launcher writes each span it ends, as one JSON line, to
``<directory>/spans-<pid>.jsonl``, and each log record, with its trace and span ids, to
``<directory>/logs-<pid>.jsonl``::

    python -m wove_otel.testing --spans /tmp/spans -m wove_executor_stdio
    python -m wove_otel.testing --spans /tmp/spans -m wove.cli worker http --port 0

It configures the OpenTelemetry SDK (a ``TracerProvider`` with a
:class:`SpanFileExporter`, service name ``--service-name``, default ``wove-worker``), calls
:func:`wove_otel.instrument`, then runs the module (``-m``) as ``__main__`` with the
remaining arguments. :func:`traced_command` builds that command line; :func:`read_spans`
and :func:`read_logs` read the files back. Needs ``opentelemetry-sdk``
(``pip install "wove-otel[sdk]"``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExportResult

__all__ = ["JsonLogHandler", "SpanFileExporter", "read_logs", "read_spans", "span_to_dict", "traced_command"]

_SDK_HINT = 'wove_otel.testing needs opentelemetry-sdk, which is not installed. Install it with: pip install "wove-otel[sdk]"'


def _require_sdk() -> None:
    try:
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError as exc:
        raise ImportError(_SDK_HINT) from exc


def _hex(value: int | None, width: int) -> str | None:
    return None if value is None else format(value, f"0{width}x")


def span_to_dict(span: ReadableSpan) -> dict[str, Any]:
    """A finished span as JSON-safe fields: ``name``, ``kind``, ``trace_id``, ``span_id``,
    ``parent_span_id`` (hex strings; None for a root span), ``attributes``, ``events``
    (``name`` and ``attributes``), ``status`` (``UNSET``/``OK``/``ERROR``),
    ``status_description``, ``service_name`` and ``pid``."""
    context = span.get_span_context()
    parent = span.parent
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": _hex(context.trace_id if context is not None else None, 32),
        "span_id": _hex(context.span_id if context is not None else None, 16),
        "parent_span_id": _hex(parent.span_id if parent is not None else None, 16),
        "attributes": {key: _jsonable(value) for key, value in (span.attributes or {}).items()},
        "events": [{"name": event.name, "attributes": {k: _jsonable(v) for k, v in (event.attributes or {}).items()}}
                   for event in span.events],
        "status": span.status.status_code.name,
        "status_description": span.status.description,
        "service_name": span.resource.attributes.get("service.name"),
        "pid": os.getpid(),
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return str(value)


class SpanFileExporter:
    """A span exporter writing one JSON object per line to ``<directory>/spans-<pid>.jsonl``
    (one file per process, so concurrent workers never interleave). Use it with the SDK's
    ``SimpleSpanProcessor`` so each span is on disk when it ends.

    Raises:
        ImportError: opentelemetry-sdk is not installed (names the extra).
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        _require_sdk()
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        """This process's file."""
        return self.directory / f"spans-{os.getpid()}.jsonl"

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        from opentelemetry.sdk.trace.export import SpanExportResult

        lines = "".join(json.dumps(span_to_dict(span), separators=(",", ":")) + "\n" for span in spans)
        with self._lock, open(self.path, "a", encoding="utf-8") as file:
            file.write(lines)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Nothing to release (each export opens and closes the file)."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Always flushed."""
        return True


class JsonLogHandler(logging.Handler):
    """A logging handler writing ``name``, ``levelname``, ``message``, ``otelTraceID`` and
    ``otelSpanID`` of each record, one JSON line each, to ``<directory>/logs-<pid>.jsonl``."""

    def __init__(self, directory: str | os.PathLike[str], level: int = logging.INFO) -> None:
        super().__init__(level)
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = json.dumps({"name": record.name, "levelname": record.levelname, "message": record.getMessage(),
                               "otelTraceID": getattr(record, "otelTraceID", None),
                               "otelSpanID": getattr(record, "otelSpanID", None), "pid": os.getpid()})
            with open(self.directory / f"logs-{os.getpid()}.jsonl", "a", encoding="utf-8") as file:
                file.write(line + "\n")
        except Exception:
            self.handleError(record)


def _read(directory: str | os.PathLike[str], prefix: str) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for path in sorted(Path(directory).glob(f"{prefix}-*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                records.append(json.loads(line))
    return records


def read_spans(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every span written under ``directory`` so far (see :func:`span_to_dict` for the fields)."""
    return _read(directory, "spans")


def read_logs(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every log record :class:`JsonLogHandler` wrote under ``directory`` so far."""
    return _read(directory, "logs")


def traced_command(directory: str | os.PathLike[str], *module_and_args: str, service_name: str = "wove-worker",
                   python: str | None = None) -> list[str]:
    """The command running ``python -m <module> <args>`` under the launcher, e.g.
    ``traced_command(tmp, "wove_executor_stdio")`` for a stdio executor's ``command``."""
    if not module_and_args:
        raise ValueError("traced_command() needs the module to run, e.g. traced_command(directory, "
                         "'wove_executor_stdio').")
    return [python or sys.executable, "-m", "wove_otel.testing", "--spans", os.fspath(directory),
            "--service-name", service_name, "-m", *module_and_args]


def configure(directory: str | os.PathLike[str], service_name: str = "wove-worker") -> None:
    """Configure the SDK to write this process's spans (and INFO+ log records) under
    ``directory`` and instrument Wove: what the launcher does before running its module."""
    _require_sdk()
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    import wove_otel

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(SimpleSpanProcessor(SpanFileExporter(directory)))  # type: ignore[arg-type]
    trace.set_tracer_provider(provider)
    wove_otel.instrument(tracer_provider=provider)
    root = logging.getLogger()
    root.addHandler(JsonLogHandler(directory))
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
