"""One trace across caller and worker: real worker processes (stdio, http, grpc, websocket)
write their spans to files (``wove_otel.testing``), the caller's go to the SDK's in-memory
exporter, and the ids must join: worker span child of the caller's client span, the task's
own span child of the worker span, the task's log records carrying the worker-side ids."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from wove.environment import DeliveryTimeoutError, ExecutorRuntime
from wove.testing import WorkerProcess, tasks
from wove_otel import names
from wove_otel.testing import read_logs, read_spans, traced_command

from .conftest import Telemetry

pytestmark = pytest.mark.integration

TRANSPORTS = ["stdio", "http", "grpc", "websocket"]


def traced_task(value: int) -> dict[str, Any]:
    """A sync task that opens a span of its own and logs inside it."""
    from opentelemetry import trace as task_trace

    with task_trace.get_tracer("task-code").start_as_current_span("inner work") as span:
        logging.getLogger("traced_task").info("inside traced_task %d", value)
        context = span.get_span_context()
        return {"trace_id": format(context.trace_id, "032x"), "span_id": format(context.span_id, "016x"),
                "value": value * 2}


async def atraced_task(value: int) -> dict[str, Any]:
    """The async twin (runs on the worker's loop, not in a thread)."""
    return traced_task(value)


def failing_task(message: str) -> None:
    raise KeyError(message)


class TracedWorker(WorkerProcess):
    """``wove worker SERVICE`` under ``python -m wove_otel.testing``: its spans go to files."""

    def __init__(self, spans: Path, service: str) -> None:
        super().__init__(service)
        self.spans = spans

    def command(self, port: int) -> list[str]:
        return traced_command(self.spans, "wove.cli", "worker", self.service, "--port", str(port),
                              service_name=f"{self.service}-worker")


ADDRESS_KEY = {"http": "url", "grpc": "target", "websocket": "url"}


@pytest.fixture
def worker_env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[dict[str, Any], Path]]:
    """An environment definition reaching a traced worker of the parametrized transport."""
    transport: str = request.param
    spans = tmp_path / "spans"
    if transport == "stdio":
        yield {"executor": "stdio", "executor_config": {"command": traced_command(spans, "wove_executor_stdio")}}, spans
        return
    worker = TracedWorker(spans, transport)
    worker.start(0)
    try:
        yield {"executor": transport, "executor_config": {ADDRESS_KEY[transport]: worker.address}}, spans
    finally:
        worker.kill()


def _one(spans: list[Any], **match: Any) -> Any:
    found = [span for span in spans if all(span.get(k) == v for k, v in match.items())]
    assert len(found) == 1, (match, spans)
    return found[0]


def _hex(value: int, width: int) -> str:
    return format(value, f"0{width}x")


@pytest.mark.parametrize("worker_env", TRANSPORTS, indirect=True)
@pytest.mark.timeout(90)
async def test_caller_and_worker_spans_share_one_trace(worker_env: tuple[dict[str, Any], Path],
                                                       otel: Telemetry) -> None:
    definition, spans_dir = worker_env
    tracer = trace.get_tracer("test")
    async with ExecutorRuntime({"w": definition}) as runtime:
        with tracer.start_as_current_span("request") as request_span:
            sync_result = await runtime.call("w", traced_task, 3)
            async_result = await runtime.call("w", atraced_task, 4)
    trace_id = _hex(request_span.get_span_context().trace_id, 32)
    assert sync_result["trace_id"] == async_result["trace_id"] == trace_id  # the task ran inside the trace
    worker_spans = read_spans(spans_dir)
    for task, result in (("traced_task", sync_result), ("atraced_task", async_result)):
        (client,) = otel.finished(f"wove/{task}")
        assert client.kind is SpanKind.CLIENT
        assert client.parent is not None and client.parent.span_id == request_span.get_span_context().span_id
        attributes = dict(client.attributes or {})
        assert attributes[names.WOVE_ENVIRONMENT] == "w"
        assert attributes[names.WOVE_EXECUTOR] == definition["executor"]
        assert attributes[names.WOVE_TASK] == task and attributes[names.WOVE_OUTCOME] == "ok"
        assert attributes[names.RPC_SYSTEM_NAME] == "wove" and attributes[names.RPC_METHOD] == f"wove/{task}"
        assert attributes[names.WOVE_REQUEST_SIZE] > 0
        run_id = attributes[names.WOVE_RUN_ID]
        server = _one(worker_spans, name=f"wove/{task}", kind="SERVER")
        assert server["trace_id"] == trace_id
        assert server["parent_span_id"] == _hex(client.context.span_id, 16)
        assert server["attributes"][names.WOVE_RUN_ID] == run_id
        assert server["pid"] != os.getpid()
        inner = _one(worker_spans, name="inner work", span_id=result["span_id"])
        assert inner["trace_id"] == trace_id and inner["parent_span_id"] == server["span_id"]
    # the task's log records in the worker carry the ids of the span they were logged in
    records = [r for r in read_logs(spans_dir) if r["message"].startswith("inside traced_task")]
    assert {(r["otelTraceID"], r["otelSpanID"]) for r in records} == {
        (trace_id, sync_result["span_id"]), (trace_id, async_result["span_id"])}


@pytest.mark.parametrize("worker_env", ["stdio"], indirect=True)
async def test_a_failed_run_has_error_status_on_both_sides(worker_env: tuple[dict[str, Any], Path],
                                                           otel: Telemetry) -> None:
    definition, spans_dir = worker_env
    async with ExecutorRuntime({"w": definition}) as runtime:
        with pytest.raises(KeyError, match="missing"):
            await runtime.call("w", failing_task, "missing")
    (client,) = otel.finished("wove/failing_task")
    assert client.status.status_code is StatusCode.ERROR
    assert client.attributes is not None and client.attributes[names.ERROR_TYPE] == "KeyError"
    assert client.attributes[names.WOVE_OUTCOME] == "error"
    assert [event.name for event in client.events] == [names.EVENT_STARTED, "exception"]
    exception = client.events[1].attributes or {}
    assert exception["exception.type"].endswith("KeyError")
    server = _one(read_spans(spans_dir), name="wove/failing_task")
    assert server["status"] == "ERROR" and server["attributes"][names.ERROR_TYPE] == "KeyError"
    assert [event["name"] for event in server["events"]] == ["exception"]


@pytest.mark.parametrize("worker_env", ["stdio"], indirect=True)
async def test_timeout_and_cancellation_are_span_events(worker_env: tuple[dict[str, Any], Path],
                                                        otel: Telemetry) -> None:
    definition, spans_dir = worker_env
    async with ExecutorRuntime({"w": definition}) as runtime:
        with pytest.raises(DeliveryTimeoutError):
            await runtime.call_with("w", tasks.sleep, (5.0,), delivery_timeout=0.3)
        running = runtime.submit("w", tasks.blocking_sleep, 5.0)
        await asyncio.sleep(0.3)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
    timed_out, = otel.finished("wove/sleep")
    assert timed_out.status.status_code is StatusCode.ERROR
    assert timed_out.attributes is not None and timed_out.attributes[names.WOVE_OUTCOME] == "timeout"
    assert names.EVENT_TIMED_OUT in [event.name for event in timed_out.events]
    cancelled, = otel.finished("wove/blocking_sleep")
    assert cancelled.attributes is not None and cancelled.attributes[names.WOVE_OUTCOME] == "cancelled"
    assert cancelled.status.status_code is StatusCode.UNSET
    assert names.EVENT_CANCELLED in [event.name for event in cancelled.events]
    # the worker ended both executions as cancelled (the runtime sent cancel_task)
    for task in ("sleep", "blocking_sleep"):
        server = _one(read_spans(spans_dir), name=f"wove/{task}")
        assert server["attributes"][names.WOVE_OUTCOME] == "cancelled"


def _crash_once(marker: str) -> int:
    if not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        os._exit(7)
    return os.getpid()


@pytest.mark.parametrize("worker_env", ["stdio"], indirect=True)
async def test_a_redelivered_run_is_one_client_span_with_an_event(worker_env: tuple[dict[str, Any], Path],
                                                                  otel: Telemetry, tmp_path: Path) -> None:
    definition, spans_dir = worker_env
    marker = tmp_path / "crashed"
    async with ExecutorRuntime({"w": definition}) as runtime:
        await runtime.call_with("w", _crash_once, (str(marker),), delivery_orphan_policy="requeue")
    (client,) = otel.finished("wove/_crash_once")  # the logical call: one span over both deliveries
    redelivered = [event for event in client.events if event.name == names.EVENT_REDELIVERED]
    assert len(redelivered) == 1
    assert "exit code 7" in str((redelivered[0].attributes or {})[names.WOVE_REASON])
    assert client.attributes is not None and client.attributes[names.WOVE_DELIVERIES] == 2
    # the first worker died inside the execution; the second one's span is the child
    (server,) = [span for span in read_spans(spans_dir) if span["name"] == "wove/_crash_once"]
    assert server["parent_span_id"] == _hex(client.context.span_id, 16)
    assert server["pid"] != int(marker.read_text())


async def test_local_runs_nest_under_the_client_span(otel: Telemetry) -> None:
    async with ExecutorRuntime({"here": {"executor": "local"}}) as runtime:
        inline = await runtime.call("here", atraced_task, 1)   # awaited in the caller's task
        framed = await runtime.call("here", traced_task, 2)    # through the in-process worker engine
    (inline_client,) = otel.finished("wove/atraced_task")
    (inner_inline,) = [s for s in otel.finished("inner work") if _hex(s.context.span_id, 16) == inline["span_id"]]
    assert inner_inline.parent is not None and inner_inline.parent.span_id == inline_client.context.span_id
    framed_spans = otel.finished("wove/traced_task")
    client = next(s for s in framed_spans if s.kind is SpanKind.CLIENT)
    server = next(s for s in framed_spans if s.kind is SpanKind.SERVER)
    assert server.parent is not None and server.parent.span_id == client.context.span_id
    (inner,) = [s for s in otel.finished("inner work") if _hex(s.context.span_id, 16) == framed["span_id"]]
    assert inner.parent is not None and inner.parent.span_id == server.context.span_id
    assert len({s.context.trace_id for s in (inline_client, inner_inline)}) == 1


async def test_uninstrumented_runs_make_no_spans_and_send_no_trace_fields(otel: Telemetry) -> None:
    import wove_otel

    wove_otel.uninstrument()
    async with ExecutorRuntime({"here": {"executor": "local"}}) as runtime:
        result = await runtime.call("here", traced_task, 1)
    assert [span.name for span in otel.finished()] == ["inner work"]  # the task's own span, a root
    assert otel.finished()[0].parent is None and result["value"] == 2


@pytest.mark.parametrize("worker_env", ["stdio"], indirect=True)
async def test_a_streamed_run_joins_the_trace(worker_env: tuple[dict[str, Any], Path], otel: Telemetry,
                                              tmp_path: Path) -> None:
    definition, spans_dir = worker_env
    async with ExecutorRuntime({"w": definition}) as runtime:
        with trace.get_tracer("test").start_as_current_span("request"):
            items = [item async for item in runtime.stream("w", tasks.count_up, 3, str(tmp_path / "n"))]
    assert items == [0, 1, 2]
    (client,) = otel.finished("wove/count_up")
    assert client.attributes is not None and client.attributes[names.WOVE_OUTCOME] == "ok"
    server = _one(read_spans(spans_dir), name="wove/count_up")
    assert server["trace_id"] == _hex(client.context.trace_id, 32)
    assert server["parent_span_id"] == _hex(client.context.span_id, 16)


def test_a_sync_client_call_is_a_child_of_the_callers_span(otel: Telemetry) -> None:
    from wove.environment import Client

    with Client({"here": {"executor": "local"}}) as client, \
            trace.get_tracer("test").start_as_current_span("sync request") as request_span:
        assert client.call("here", traced_task, 1)["value"] == 2
        assert client.submit("here", atraced_task, 2).result()["value"] == 4
    for name in ("wove/traced_task", "wove/atraced_task"):
        client_span = next(s for s in otel.finished(name) if s.kind is SpanKind.CLIENT)
        assert client_span.parent is not None
        assert client_span.parent.span_id == request_span.get_span_context().span_id
