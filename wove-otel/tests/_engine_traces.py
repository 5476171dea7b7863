"""What the engine trace tests (test_engines_*.py) share: the tasks, the check that one
trace joins the caller and an engine's worker process, and worker subprocesses.

Each engine's test starts a real worker of that engine whose process has the SDK
configured by ``wove_otel.testing`` (the traced launcher, or ``configure()`` in the
engine's own worker start-up hook), so its spans and log records land in files the test
reads back; the caller's spans are the in-memory exporter's (conftest.py).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

from wove.environment import ExecutorRuntime
from wove_otel import names
from wove_otel.testing import read_logs, read_spans

from .conftest import Telemetry

#: The Redis database of these tests (the engines' own tests use 1 to 5).
REDIS_DB = 6
ROOT = Path(__file__).resolve().parents[2]
#: Seconds the worker's spans may take to reach its span files after the caller has the outcome.
SPANS_TIMEOUT = 15.0


def redis_url(host: str, port: int) -> str:
    return f"redis://{host}:{port}/{REDIS_DB}"


def flush_redis(url: str) -> None:
    """Empty this module's Redis database (theirs alone: see :data:`REDIS_DB`)."""
    from redis import Redis

    connection = Redis.from_url(url)
    try:
        connection.flushdb()
    finally:
        connection.close()


def engine_conftest(distribution: str, file: str = "conftest.py") -> ModuleType:
    """A module of an engine's ``tests/`` (by default its ``conftest.py``: its fixtures starting
    servers and clusters, reused as they are); it must not import its package relatively."""
    name = f"_engine_{file.removesuffix('.py')}_{distribution.replace('-', '_')}"
    if name in sys.modules:
        return sys.modules[name]
    path = ROOT / distribution / "tests" / file
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before it runs: its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def make_traced_task() -> Callable[[int], dict[str, Any]]:
    """A sync task (a closure: pickled by value, engine workers cannot import test modules)
    opening a span of its own and logging in it; it returns that span's ids and its pid."""

    def traced_task(value: int) -> dict[str, Any]:
        import logging
        import os

        from opentelemetry import trace as task_trace

        with task_trace.get_tracer("task-code").start_as_current_span("inner work") as span:
            logging.getLogger("traced_task").warning("inside traced_task %d", value)
            context = span.get_span_context()
            return {"trace_id": format(context.trace_id, "032x"), "span_id": format(context.span_id, "016x"),
                    "pid": os.getpid(), "value": value * 2}

    return traced_task


def make_failing_task() -> Callable[[str], Any]:
    """An async task (a closure) that raises ``ValueError(message)``."""

    async def failing_task(message: str) -> None:
        raise ValueError(message)

    return failing_task


def _hex_span(span: ReadableSpan) -> str:
    assert span.context is not None
    return format(span.context.span_id, "016x")


def _producer(otel: Telemetry, environment: str, run_trace: str) -> ReadableSpan:
    (producer,) = [span for span in otel.finished(f"send {environment}")
                   if span.context is not None and format(span.context.trace_id, "032x") == run_trace]
    return producer


def _consumer(worker_spans: list[dict[str, Any]], run_id: str) -> dict[str, Any]:
    found = [span for span in worker_spans if span["kind"] == "CONSUMER"
             and span["attributes"].get(names.WOVE_RUN_ID) == run_id]
    assert len(found) == 1, f"worker spans of run {run_id}: {found} (all: {worker_spans})"
    return found[0]


async def _worker_spans(spans_dir: Path, run_ids: list[str], span_id: str,
                        timeout: float = SPANS_TIMEOUT) -> list[dict[str, Any]]:
    """The worker's spans once the consumer spans of ``run_ids`` and span ``span_id`` are in
    its files (a batch span processor exports them a moment after the caller has the outcome)."""
    deadline = time.monotonic() + timeout
    while True:
        spans = read_spans(spans_dir)
        runs = {span["attributes"].get(names.WOVE_RUN_ID) for span in spans if span["kind"] == "CONSUMER"}
        if set(run_ids) <= runs and any(span["span_id"] == span_id for span in spans):
            return spans
        if time.monotonic() > deadline:
            return spans  # the checks that follow say what is missing
        await asyncio.sleep(0.05)


def _check_pair(producer: ReadableSpan, consumer: dict[str, Any], parent: ReadableSpan, environment: str,
                executor: str, outcome: str) -> None:
    """The caller's PRODUCER span under ``parent`` and the worker's CONSUMER span under it."""
    trace_id = format(parent.get_span_context().trace_id, "032x")
    attributes = dict(producer.attributes or {})
    assert producer.kind is SpanKind.PRODUCER
    assert producer.parent is not None and producer.parent.span_id == parent.get_span_context().span_id
    assert attributes[names.MESSAGING_SYSTEM] == executor
    assert attributes[names.MESSAGING_DESTINATION_NAME] == environment
    assert attributes[names.WOVE_EXECUTOR] == executor
    assert attributes[names.WOVE_OUTCOME] == outcome
    run_id = attributes[names.WOVE_RUN_ID]
    assert consumer["trace_id"] == trace_id
    assert consumer["parent_span_id"] == _hex_span(producer)
    assert consumer["pid"] != os.getpid(), "the consumer span must come from the engine's worker process"
    assert consumer["name"] == f"process {attributes[names.WOVE_TASK]}"
    worker_attributes = consumer["attributes"]
    assert worker_attributes[names.WOVE_WORKER] == f"backend:{executor}"
    assert worker_attributes[names.MESSAGING_SYSTEM] == executor
    assert worker_attributes[names.MESSAGING_OPERATION_TYPE] == "process"
    assert worker_attributes[names.MESSAGING_MESSAGE_ID] == run_id
    assert worker_attributes[names.WOVE_OUTCOME] == outcome


async def check_one_trace(runtime: ExecutorRuntime, environment: str, executor: str, spans_dir: Path,
                          otel: Telemetry) -> None:
    """Two runs on ``environment``, each in a request span of its own: a sync task that
    opens a span and logs (the caller's PRODUCER span, the worker's CONSUMER span under it,
    the task's span and log record under that, one trace id), then an async task that
    raises (both spans ERROR with ``error.type``, still one trace)."""
    tracer = trace.get_tracer("engine-test")
    with tracer.start_as_current_span("request") as request:
        result = await runtime.call(environment, make_traced_task(), 21)
    trace_id = format(request.get_span_context().trace_id, "032x")
    assert result["value"] == 42 and result["trace_id"] == trace_id

    with (tracer.start_as_current_span("failing request") as failing_request,
          pytest.raises(ValueError, match="broke on the worker")):
        await runtime.call(environment, make_failing_task(), "broke on the worker")
    failing_trace = format(failing_request.get_span_context().trace_id, "032x")
    assert failing_trace != trace_id

    producer = _producer(otel, environment, trace_id)
    failed = _producer(otel, environment, failing_trace)
    run_ids = [str((span.attributes or {})[names.WOVE_RUN_ID]) for span in (producer, failed)]
    worker_spans = await _worker_spans(spans_dir, run_ids, result["span_id"])
    consumer = _consumer(worker_spans, run_ids[0])
    _check_pair(producer, consumer, request, environment, executor, "ok")
    assert consumer["pid"] == result["pid"], "the task ran in the process that made the consumer span"
    (inner,) = [span for span in worker_spans if span["span_id"] == result["span_id"]]
    assert inner["name"] == "inner work" and inner["trace_id"] == trace_id
    assert inner["parent_span_id"] == consumer["span_id"]
    records = [record for record in read_logs(spans_dir) if record["message"] == "inside traced_task 21"]
    assert [(r["otelTraceID"], r["otelSpanID"]) for r in records] == [(trace_id, result["span_id"])]

    failed_consumer = _consumer(worker_spans, run_ids[1])
    _check_pair(failed, failed_consumer, failing_request, environment, executor, "error")
    assert failed.status.status_code is StatusCode.ERROR
    assert (failed.attributes or {})[names.ERROR_TYPE] == "ValueError"
    assert failed_consumer["status"] == "ERROR"
    assert failed_consumer["attributes"][names.ERROR_TYPE] == "ValueError"
    assert "exception" in [event["name"] for event in failed_consumer["events"]]


class WorkerProcess:
    """An engine's worker command in a session of its own, its output in ``log``; :meth:`start`
    waits until ``ready(self)`` is true."""

    def __init__(self, argv: Sequence[str], log: Path, ready: Callable[[WorkerProcess], bool], *,
                 cwd: Path | None = None, env: dict[str, str] | None = None, what: str = "worker") -> None:
        self.argv, self.log, self.ready, self.cwd, self.what = list(argv), log, ready, cwd, what
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def start(self, timeout: float = 30.0) -> WorkerProcess:
        """Start it and wait for ``ready``.

        Raises:
            RuntimeError: it exited, or was not ready within ``timeout`` (with its output).
        """
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, cwd=self.cwd, env=self.env)
        deadline = time.monotonic() + timeout
        while not self.ready(self):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the {self.what} did not start (exit {self.proc.poll()}): {self.argv}\n"
                                   f"{self.output()[-3000:]}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """SIGTERM to its process group, SIGKILL after 15 s."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def traced(spans_dir: Path, service: str, module: str, *args: str) -> list[str]:
    """``python -m wove_otel.testing --spans DIR --service-name SERVICE -m MODULE ARGS...``."""
    from wove_otel.testing import traced_command

    return traced_command(spans_dir, module, *args, service_name=service, python=sys.executable)
