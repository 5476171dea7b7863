"""The wire codec: round trips, Wove 2.x shapes, and rejection of bad bytes."""

from __future__ import annotations

import base64
import json
import socket
import threading
from typing import Any

import cloudpickle
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wove.errors import DispatchError, ProtocolError
from wove.protocol import (
    decode_command,
    decode_events,
    encode_event,
    encode_frame,
    normalize_exception,
    pack_frame,
)


def b64pickle(value: Any) -> str:
    return base64.b64encode(cloudpickle.dumps(value)).decode()


def run_frame(**overrides: Any) -> dict[str, Any]:
    frame = {"type": "run_task", "run_id": "t:1", "task_id": "t", "callable": len, "args": {"obj": [1, 2]},
             "delivery": {"delivery_orphan_policy": "cancel"}}
    frame.update(overrides)
    return frame


def test_command_round_trip_uses_pickle_fields() -> None:
    wire = encode_frame(run_frame())
    obj = json.loads(wire)
    assert set(obj) == {"type", "run_id", "task_id", "callable_pickle", "args_pickle", "delivery"}
    frame = decode_command(wire)
    assert frame["callable"] is len and frame["args"] == {"obj": [1, 2]}
    assert frame["delivery"] == {"delivery_orphan_policy": "cancel"}


def test_events_accept_one_list_or_events_object_and_pickled_or_plain_error() -> None:
    result = {"type": "task_result", "run_id": "t:1", "task_id": "t", "result_pickle": b64pickle({"x": 1})}
    plain_error = {"type": "task_error", "run_id": "t:2", "task_id": "t", "error": {"kind": "E", "message": "m"}}
    pickled_error = {"type": "task_error", "run_id": "t:3", "task_id": "t",
                     "error_pickle": b64pickle({"kind": "E", "message": "p"}), "exception_pickle": b64pickle(KeyError("k"))}
    assert decode_events(json.dumps(result))[0]["result"] == {"x": 1}
    events = decode_events(json.dumps([result, plain_error]).encode())
    assert [e["type"] for e in events] == ["task_result", "task_error"]
    [event] = decode_events({"events": [pickled_error]})
    assert event["error"]["message"] == "p" and isinstance(event["exception"], KeyError)


def test_unpicklable_argument_names_the_task_and_path() -> None:
    class Report:
        def __init__(self) -> None:
            self.conn = socket.socket()

    report = Report()
    try:
        with pytest.raises(DispatchError, match=r"Task 'build': Cannot pickle args\['report'\]\.conn: socket"):
            encode_frame(run_frame(task_id="build", args={"report": report}))
        with pytest.raises(DispatchError, match=r"Cannot pickle args\['locks'\]\[1\]: lock"):
            encode_frame(run_frame(args={"locks": [1, threading.Lock()]}))
    finally:
        report.conn.close()


def test_unpicklable_result_becomes_an_error_event_and_exception_is_optional() -> None:
    lock = threading.Lock()
    event = json.loads(encode_event({"type": "task_result", "run_id": "t:1", "task_id": "t", "result": lock}))
    assert event["type"] == "task_error" and "cannot be sent back" in event["error"]["message"]

    class Unpicklable(Exception):
        def __reduce__(self) -> Any:
            raise TypeError("nope")

    exc = Unpicklable("bad")
    wire = json.loads(encode_event({"type": "task_error", "run_id": "t:1", "task_id": "t", "exception": exc,
                                    "error": normalize_exception(exc)}))
    assert "exception_pickle" not in wire
    assert wire["error"]["kind"] == "Unpicklable" and wire["error"]["message"] == "bad"
    assert "Unpicklable" in wire["error"]["traceback"] or wire["error"]["traceback"] == "Unpicklable: bad\n"


def test_malformed_commands_say_what_was_wrong() -> None:
    cases = [
        (b"\xff\xfe", "not valid JSON"),
        (b"[1,2]", "must be a JSON object, got list"),
        (b'{"type":"explode"}', "Unknown command type 'explode'"),
        (b'{"type":"run_task","task_id":"t"}', "non-empty string 'run_id'"),
        (b'{"type":"run_task","run_id":"t:1","task_id":"t"}', "needs 'callable_pickle'"),
        (b'{"type":"run_task","run_id":"t:1","task_id":"t","callable_pickle":"%%%"}', "not valid base64"),
        (b'{"type":"run_task","run_id":"t:1","task_id":"t","callable_pickle":"AAAA"}', "does not unpickle"),
    ]
    for data, message in cases:
        with pytest.raises(ProtocolError, match=message):
            decode_command(data)
    with pytest.raises(ProtocolError) as info:
        decode_command(json.dumps({"type": "run_task", "run_id": "t:9", "task_id": "t", "callable_pickle": "AAAA"}))
    assert info.value.run_id == "t:9" and info.value.task_id == "t"  # type: ignore[attr-defined]


def test_result_that_does_not_unpickle_here_becomes_a_task_error() -> None:
    raw = {"type": "task_result", "run_id": "t:1", "task_id": "t", "result_pickle": base64.b64encode(b"\x80\x05garbage").decode()}
    [event] = decode_events(json.dumps(raw))
    assert event["type"] == "task_error" and event["error"]["source"] == "executor"
    assert "could not be decoded here" in event["error"]["message"]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_protocol_errors(data: bytes) -> None:
    for decode in (decode_command, decode_events):
        try:
            decode(data)
        except ProtocolError:
            pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
frame_like = st.dictionaries(
    st.sampled_from(["type", "run_id", "task_id", "events", "result_pickle", "error", "error_pickle",
                     "callable_pickle", "args_pickle", "delivery", "message"]),
    json_values | st.sampled_from(["run_task", "task_result", "task_error", "log", "heartbeat", "cancel_task", "shutdown"]),
    max_size=6,
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(frame_like, st.lists(frame_like, max_size=3), json_values))
def test_arbitrary_json_shapes_raise_only_protocol_errors(value: Any) -> None:
    data = json.dumps(value)
    for decode in (decode_command, decode_events):
        try:
            decode(data)
        except ProtocolError:
            pass


@settings(max_examples=100, deadline=None)
@given(json_values)
def test_any_json_result_round_trips(value: Any) -> None:
    wire = encode_event({"type": "task_result", "run_id": "t:1", "task_id": "t", "result": value})
    assert decode_events(wire)[0]["result"] == value


def test_encoded_frames_are_the_json_of_the_packed_frame() -> None:
    for frame in (run_frame(), run_frame(args={"quote": 'a"b\\c', "n": [1, 2]}),
                  {"type": "task_result", "run_id": "t:1", "task_id": "t", "result": {"x": "ü"}},
                  {"type": "task_started", "run_id": "t:1", "task_id": "t"}):
        encoded = encode_frame(frame)
        assert json.loads(encoded) == json.loads(json.dumps(pack_frame(frame)))


delivery_values = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([1.0, 0.5, 2.5e-3]),
                            st.text(max_size=8))


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=12), st.text(max_size=12),
       st.dictionaries(st.sampled_from(["delivery_cancel_mode", "delivery_orphan_policy", "delivery_timeout",
                                        "delivery_capture_output", "delivery_idempotency_key"]),
                       delivery_values, max_size=5))
def test_a_run_task_encodes_exactly_as_the_general_json_of_its_packed_frame(
        run_id: str, task_id: str, delivery: dict[str, Any]) -> None:
    # the usual run_task has its own encoder; its bytes must be the general encoder's,
    # a second time too (the delivery's JSON is remembered), and True, 1 and 1.0 each
    # keep their own JSON
    for value in (True, 1, 1.0):
        frame = run_frame(run_id=run_id, task_id=task_id, delivery={**delivery, "delivery_heartbeat_seconds": value})
        general = json.dumps(pack_frame(frame), separators=(",", ":"), ensure_ascii=False).encode()
        assert encode_frame(frame) == general
        assert encode_frame(frame) == general
        assert decode_command(encode_frame(frame))["delivery"] == frame["delivery"]


def test_a_run_task_of_another_shape_takes_the_general_encoder() -> None:
    odd = [run_frame(traceparent="00-" + "1" * 32 + "-" + "2" * 16 + "-01"),  # a seventh field
           run_frame(delivery={"delivery_timeout": [1, 2]}),  # an unhashable value
           run_frame(delivery={"delivery_timeout": 3 + 4j}),  # not JSON: the general encoder says so
           {"run_id": "t:1", "type": "run_task", "task_id": "t", "callable": len, "args": {}, "delivery": {}}]
    for frame in odd[:2] + odd[3:]:
        assert json.loads(encode_frame(frame)) == json.loads(json.dumps(pack_frame(frame)))
    with pytest.raises(TypeError, match="complex is not JSON serializable"):
        encode_frame(odd[2])


def test_a_result_that_is_not_base64_becomes_a_task_error() -> None:
    raw = {"type": "task_result", "run_id": "t:1", "task_id": "t", "result_pickle": "not base64!"}
    [event] = decode_events(json.dumps(raw))
    assert event["type"] == "task_error" and "not valid base64" in event["error"]["message"]
    [event] = decode_events(json.dumps({**raw, "result_pickle": b64pickle({"x": [1]})}))
    assert event == {"type": "task_result", "run_id": "t:1", "task_id": "t", "result": {"x": [1]}}
