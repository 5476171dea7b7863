"""The OpenTelemetry observer: spans and metrics from Wove's lifecycle hook (``wove.observe``)."""

from __future__ import annotations

import sys
import time
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from wove.observe import ExecutionInfo, Observer, RunInfo

from . import names

#: the W3C Trace Context propagator: the wire fields are ``traceparent`` and ``tracestate``
#: whatever propagators the application configured globally (docs/wire.md)
_PROPAGATOR = TraceContextTextMapPropagator()

#: seconds: OpenTelemetry's recommended boundaries for duration histograms
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0,
                    60.0, 300.0)
#: bytes
SIZE_BUCKETS = (64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)

_MESSAGING: dict[type, bool] = {}


def _is_messaging(run: RunInfo) -> bool:
    """True when ``run`` goes through a distributed engine (messaging conventions): its
    executor is a wove-backend ``BackendAdapterEnvironmentExecutor``."""
    known = _MESSAGING.get(run.executor_type)
    if known is None:
        backend = sys.modules.get("wove_backend")  # an engine adapter's executor implies it is imported
        base = getattr(backend, "BackendAdapterEnvironmentExecutor", None) if backend is not None else None
        known = base is not None and isinstance(run.executor_type, type) and issubclass(run.executor_type, base)
        _MESSAGING[run.executor_type] = known
    return known


def worker_kind(worker: str) -> str:
    """The bounded part of a worker engine's name (``"stdio:4242"`` -> ``"stdio"``)."""
    return worker.split(":", 1)[0]


class _RunState:
    __slots__ = ("attributes", "span", "started", "token")

    def __init__(self, span: Span, token: Any, attributes: dict[str, str], started: float) -> None:
        self.span = span
        self.token = token
        self.attributes = attributes
        self.started = started


class WoveObserver(Observer):
    """Spans and metrics for Wove runs through OpenTelemetry's API (``wove_otel.instrument``
    installs one; see the package docstring for the span names, attributes and metrics).

    Args:
        tracer_provider: where spans go (default: the global one, as set by the SDK).
        meter_provider: where metrics go (default: the global one).
    """

    def __init__(self, tracer_provider: trace.TracerProvider | None = None,
                 meter_provider: metrics.MeterProvider | None = None) -> None:
        from . import __version__

        self.tracer = trace.get_tracer("wove_otel", __version__, tracer_provider=tracer_provider,
                                       schema_url=names.SCHEMA_URL)
        meter = metrics.get_meter("wove_otel", __version__, meter_provider=meter_provider,
                                  schema_url=names.SCHEMA_URL)
        self.run_duration = meter.create_histogram(
            names.RUN_DURATION, unit="s", description="Duration of Wove runs on the caller, from submission to outcome.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
        self.runs_active = meter.create_up_down_counter(
            names.RUN_ACTIVE, unit="{run}", description="Wove runs submitted and not finished.")
        self.run_outcomes = meter.create_counter(
            names.RUN_OUTCOMES, unit="{run}", description="Finished Wove runs by outcome.")
        self.redeliveries = meter.create_counter(
            names.RUN_REDELIVERIES, unit="{delivery}",
            description="Runs a transport lost and delivered again (orphan policy requeue).")
        self.request_size = meter.create_histogram(
            names.RUN_REQUEST_SIZE, unit="By", description="Size of the encoded run_task command.",
            explicit_bucket_boundaries_advisory=SIZE_BUCKETS)
        self.execution_duration = meter.create_histogram(
            names.EXECUTION_DURATION, unit="s", description="Duration of executions on a worker.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
        self.executions_active = meter.create_up_down_counter(
            names.EXECUTION_ACTIVE, unit="{execution}", description="Executions running on a worker.")

    # -- the caller's side -----------------------------------------------------------
    def run_submitted(self, run: RunInfo) -> None:
        messaging = _is_messaging(run)
        attributes: dict[str, Any] = {
            names.WOVE_ENVIRONMENT: run.environment,
            names.WOVE_EXECUTOR: run.executor,
            names.WOVE_TASK: run.task,
            names.WOVE_RUN_ID: run.run_id,
        }
        if messaging:
            name = f"send {run.environment}"
            kind = SpanKind.PRODUCER
            attributes.update({
                names.MESSAGING_SYSTEM: run.executor,
                names.MESSAGING_OPERATION_TYPE: "send",
                names.MESSAGING_OPERATION_NAME: "send",
                names.MESSAGING_DESTINATION_NAME: run.environment,
                names.MESSAGING_MESSAGE_ID: run.run_id,
            })
        else:
            name = names.rpc_method(run.task)
            kind = SpanKind.CLIENT
            attributes.update({names.RPC_SYSTEM_NAME: names.RPC_SYSTEM, names.RPC_METHOD: name})
        span = self.tracer.start_span(name, kind=kind, attributes=attributes)
        current = trace.set_span_in_context(span)
        if not run.inline:
            _PROPAGATOR.inject(run.carrier, context=current)
        # current while the run is awaited: the runtime's records and an inline run's own spans join it
        # (not for a streamed run, which the consumer drives from task to task)
        token = None if run.streamed else otel_context.attach(current)
        metric_attributes = {names.WOVE_ENVIRONMENT: run.environment, names.WOVE_EXECUTOR: run.executor}
        run.data[self] = _RunState(span, token, metric_attributes, time.perf_counter())
        self.runs_active.add(1, metric_attributes)

    def run_sent(self, run: RunInfo) -> None:
        state = run.data.get(self)
        if state is not None and run.request_size is not None:
            state.span.set_attribute(names.WOVE_REQUEST_SIZE, run.request_size)
            self.request_size.record(run.request_size, state.attributes)

    def run_started(self, run: RunInfo) -> None:
        state = run.data.get(self)
        if state is not None:
            state.span.add_event(names.EVENT_STARTED)

    def run_redelivered(self, run: RunInfo, reason: str) -> None:
        state = run.data.get(self)
        if state is not None:
            state.span.add_event(names.EVENT_REDELIVERED, {names.WOVE_REASON: reason,
                                                           names.WOVE_DELIVERY: run.deliveries + 1})
            self.redeliveries.add(1, state.attributes)

    def run_timed_out(self, run: RunInfo, message: str) -> None:
        state = run.data.get(self)
        if state is not None:
            state.span.add_event(names.EVENT_TIMED_OUT, {names.WOVE_MESSAGE: message})

    def run_cancelled(self, run: RunInfo, message: str) -> None:
        state = run.data.get(self)
        if state is not None:
            state.span.add_event(names.EVENT_CANCELLED, {names.WOVE_MESSAGE: message})

    def run_finished(self, run: RunInfo, outcome: str, error: BaseException | None) -> None:
        state = run.data.pop(self, None)
        if state is None:
            return
        if state.token is not None:
            otel_context.detach(state.token)
        span = state.span
        span.set_attribute(names.WOVE_OUTCOME, outcome)
        if run.deliveries:
            span.set_attribute(names.WOVE_DELIVERIES, run.deliveries)
        attributes = {**state.attributes, names.WOVE_OUTCOME: outcome}
        if error is not None and outcome != "cancelled":
            error_type = type(error).__qualname__
            attributes[names.ERROR_TYPE] = error_type
            span.set_attribute(names.ERROR_TYPE, error_type)
            span.record_exception(error, escaped=True)
            span.set_status(Status(StatusCode.ERROR, f"{error_type}: {error}"))
        span.end()
        self.runs_active.add(-1, state.attributes)
        self.run_outcomes.add(1, attributes)
        self.run_duration.record(time.perf_counter() - state.started, attributes)

    # -- the worker's side -----------------------------------------------------------
    def execution_started(self, execution: ExecutionInfo) -> None:
        kind_name = worker_kind(execution.worker)
        attributes: dict[str, Any] = {
            names.WOVE_TASK: execution.task,
            names.WOVE_RUN_ID: execution.run_id,
            names.WOVE_WORKER: execution.worker,
        }
        if kind_name == "backend":  # delivered by an engine adapter: a message processed
            name = f"process {execution.task}"
            kind = SpanKind.CONSUMER
            attributes.update({
                names.MESSAGING_OPERATION_TYPE: "process",
                names.MESSAGING_OPERATION_NAME: "process",
                names.MESSAGING_MESSAGE_ID: execution.run_id,
            })
            system = execution.worker.partition(":")[2]  # "backend:rq": the engine that delivered it
            if system:
                attributes[names.MESSAGING_SYSTEM] = system
        else:
            name = names.rpc_method(execution.task)
            kind = SpanKind.SERVER
            attributes.update({names.RPC_SYSTEM_NAME: names.RPC_SYSTEM, names.RPC_METHOD: name})
        parent = _PROPAGATOR.extract(execution.carrier) if execution.carrier else None
        span = self.tracer.start_span(name, context=parent, kind=kind, attributes=attributes)
        token = otel_context.attach(trace.set_span_in_context(span))
        metric_attributes = {names.WOVE_WORKER: kind_name}
        execution.data[self] = _RunState(span, token, metric_attributes, time.perf_counter())
        self.executions_active.add(1, metric_attributes)

    def execution_finished(self, execution: ExecutionInfo, outcome: str, error: BaseException | None) -> None:
        state = execution.data.pop(self, None)
        if state is None:
            return
        otel_context.detach(state.token)
        span = state.span
        span.set_attribute(names.WOVE_OUTCOME, outcome)
        attributes = {**state.attributes, names.WOVE_OUTCOME: outcome}
        if error is not None:
            error_type = type(error).__qualname__
            attributes[names.ERROR_TYPE] = error_type
            span.set_attribute(names.ERROR_TYPE, error_type)
            span.record_exception(error, escaped=True)
            span.set_status(Status(StatusCode.ERROR, f"{error_type}: {error}"))
        elif outcome == "cancelled":
            span.add_event(names.EVENT_CANCELLED, {names.WOVE_MESSAGE: "the execution was cancelled"})
        span.end()
        self.executions_active.add(-1, state.attributes)
        self.execution_duration.record(time.perf_counter() - state.started, attributes)
