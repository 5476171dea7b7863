"""Log records join the trace: the record factory's ids, and the SDK's LoggingHandler."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from opentelemetry.sdk._logs import LoggingHandler
from opentelemetry.trace import SpanKind

import wove_otel
from wove.environment import ExecutorRuntime
from wove_otel import names

from .conftest import Telemetry


class Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def kept() -> Iterator[Keep]:
    handler = Keep()
    for name in ("wove.runtime", "wove_otel_test"):
        logging.getLogger(name).addHandler(handler)
    runtime_logger = logging.getLogger("wove.runtime")
    level = runtime_logger.level
    runtime_logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        runtime_logger.setLevel(level)
        for name in ("wove.runtime", "wove_otel_test"):
            logging.getLogger(name).removeHandler(handler)


async def log_inside(message: str) -> str:
    logging.getLogger("wove_otel_test").warning(message)
    return message


def log_inside_sync(message: str) -> str:
    logging.getLogger("wove_otel_test").warning(message)
    return message


def _hex(value: int, width: int) -> str:
    return format(value, f"0{width}x")


async def test_records_carry_the_ids_of_the_current_span(otel: Telemetry, kept: Keep) -> None:
    async with ExecutorRuntime({"here": {"executor": "local"}}) as runtime:
        await runtime.call("here", log_inside, "inline")
        await runtime.call("here", log_inside_sync, "framed")
    logging.getLogger("wove_otel_test").warning("outside")
    by_message = {record.getMessage(): record for record in kept.records}
    (inline_client,) = otel.finished("wove/log_inside")
    assert by_message["inline"].otelTraceID == _hex(inline_client.context.trace_id, 32)  # type: ignore[attr-defined]
    assert by_message["inline"].otelSpanID == _hex(inline_client.context.span_id, 16)  # type: ignore[attr-defined]
    server = next(s for s in otel.finished("wove/log_inside_sync") if s.kind is SpanKind.SERVER)
    assert by_message["framed"].otelSpanID == _hex(server.context.span_id, 16)  # type: ignore[attr-defined]
    assert by_message["framed"].otelServiceName == "wove-otel-tests"  # type: ignore[attr-defined]
    assert by_message["outside"].otelTraceID == "0"  # type: ignore[attr-defined]
    # the runtime's own lifecycle record of the framed run is inside its client span
    client = next(s for s in otel.finished("wove/log_inside_sync") if s.kind is SpanKind.CLIENT)
    run_id = (client.attributes or {})[names.WOVE_RUN_ID]
    runtime_records = [r for r in kept.records if r.name == "wove.runtime" and f"run_id={run_id}" in r.getMessage()
                       and r.getMessage().endswith("run_task")]
    assert [r.otelSpanID for r in runtime_records] == [_hex(client.context.span_id, 16)]  # type: ignore[attr-defined]


@pytest.mark.filterwarnings("ignore:`LoggingHandler` in `opentelemetry-sdk` is deprecated:DeprecationWarning")
async def test_the_sdk_logging_handler_exports_records_with_the_trace_context(otel: Telemetry) -> None:
    handler = LoggingHandler(logger_provider=otel.logger_provider)
    logger = logging.getLogger("wove_otel_test")
    logger.addHandler(handler)
    try:
        async with ExecutorRuntime({"here": {"executor": "local"}}) as runtime:
            await runtime.call("here", log_inside_sync, "exported")
    finally:
        logger.removeHandler(handler)
    server = next(s for s in otel.finished("wove/log_inside_sync") if s.kind is SpanKind.SERVER)
    exported = [item.log_record for item in otel.logs.get_finished_logs() if item.log_record.body == "exported"]
    assert [(r.trace_id, r.span_id) for r in exported] == [(server.context.trace_id, server.context.span_id)]


def test_uninstrument_puts_the_record_factory_back(kept: Keep) -> None:
    before = logging.getLogRecordFactory()
    wove_otel.instrument()
    assert logging.getLogRecordFactory() is not before
    wove_otel.uninstrument()
    assert logging.getLogRecordFactory() is before
    logging.getLogger("wove_otel_test").warning("plain")
    assert not hasattr(kept.records[-1], "otelTraceID")
    wove_otel.instrument(log_correlation=False)
    try:
        assert logging.getLogRecordFactory() is before
    finally:
        wove_otel.uninstrument()


def test_uninstrument_when_another_factory_wrapped_ours(kept: Keep) -> None:
    """A library wrapping the record factory after instrument() (Ray does on import) keeps
    ours in its chain; after uninstrument() ours adds nothing to the records any more."""
    before = logging.getLogRecordFactory()
    wove_otel.instrument()
    ours = logging.getLogRecordFactory()

    def wrapper(*args: object, **kwargs: object) -> logging.LogRecord:
        record = ours(*args, **kwargs)
        record.wrapped = True
        return record

    logging.setLogRecordFactory(wrapper)
    try:
        logging.getLogger("wove_otel_test").warning("instrumented")
        assert kept.records[-1].otelTraceID == "0" and kept.records[-1].wrapped
        wove_otel.uninstrument()
        assert logging.getLogRecordFactory() is wrapper  # not ours to take out
        logging.getLogger("wove_otel_test").warning("uninstrumented")
        assert kept.records[-1].wrapped and not hasattr(kept.records[-1], "otelTraceID")
    finally:
        wove_otel.uninstrument()
        logging.setLogRecordFactory(before)
