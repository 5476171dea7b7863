"""Backend payloads carry the trace context, so every engine adapter's workers join the trace."""

from __future__ import annotations

from wove.testing import tasks
from wove_backend import build_backend_payload, payload_from_b64, payload_to_b64

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _frame(**extra: object) -> dict[str, object]:
    return {"type": "run_task", "run_id": "add:1", "task_id": "add", "callable": tasks.add,
            "args": {"a": 1, "b": 2}, "delivery": {}, **extra}


def test_the_payload_carries_traceparent_and_tracestate() -> None:
    payload = build_backend_payload(_frame(traceparent=TRACEPARENT, tracestate="vendor=1"),
                                    callback_url="http://127.0.0.1:1/cb", adapter="dask")
    decoded = payload_from_b64(payload_to_b64(payload))  # as engines that take a string move it
    assert (decoded["traceparent"], decoded["tracestate"]) == (TRACEPARENT, "vendor=1")


def test_a_payload_without_trace_context_has_no_such_fields() -> None:
    payload = build_backend_payload(_frame(traceparent=7), callback_url="http://127.0.0.1:1/cb", adapter="dask")
    assert "traceparent" not in payload and "tracestate" not in payload
