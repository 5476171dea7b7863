"""Binary frames: pickles as raw bytes with protocol-5 out-of-band buffers (docs/wire.md)."""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import threading
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wove.errors import DispatchError, PayloadTooLargeError, ProtocolError
from wove.options import PAYLOAD_OPTIONS
from wove.protocol import (
    BINARY_MAGIC,
    BINARY_PREFIX_BYTES,
    CAPABILITY_BINARY_FRAMES,
    binary_frame_size,
    binary_header_size,
    decode_command,
    decode_events,
    encode_binary_parts,
    encode_event,
    encode_events,
    encode_frame,
    is_binary,
)
from wove.session import SERVICE_CAPABILITIES, WorkerService
from wove.testing import tasks
from wove.transport import PayloadPolicy

BIG = 1 << 20  # well above the out-of-band threshold


def run_frame(args: dict[str, Any], fn: Any = tasks.echo) -> dict[str, Any]:
    return {"type": "run_task", "run_id": "echo:1", "task_id": "echo", "callable": fn, "args": args,
            "delivery": {"delivery_orphan_policy": "cancel"}}


def header_of(data: bytes) -> dict[str, Any]:
    _magic, size, _body = struct.unpack_from("!4sIQ", data)
    return json.loads(data[BINARY_PREFIX_BYTES:BINARY_PREFIX_BYTES + size])  # type: ignore[no-any-return]


def test_a_binary_frame_says_its_size_and_is_told_from_json() -> None:
    data = encode_frame(run_frame({"value": 1}), binary=True)
    assert data.startswith(BINARY_MAGIC) and is_binary(data)
    assert binary_frame_size(data[:BINARY_PREFIX_BYTES]) == len(data)
    header_size = binary_header_size(data[:BINARY_PREFIX_BYTES])
    assert json.loads(data[BINARY_PREFIX_BYTES:BINARY_PREFIX_BYTES + header_size])["run_id"] == "echo:1"
    with pytest.raises(ProtocolError, match="Not a binary frame"):
        binary_header_size(b"{" * BINARY_PREFIX_BYTES)
    with pytest.raises(ProtocolError, match="starts with 16 bytes; got 4"):
        binary_header_size(data[:4])
    assert not is_binary(encode_frame(run_frame({"value": 1})))
    header = header_of(data)
    assert header["run_id"] == "echo:1" and set(header["pickles"]) == {"callable_pickle", "args_pickle"}
    command = decode_command(data)
    assert command["callable"] is tasks.echo and command["args"] == {"value": 1}
    assert command["delivery"] == {"delivery_orphan_policy": "cancel"}


def test_large_buffers_travel_out_of_band_without_a_copy_into_the_pickle() -> None:
    payload = {"b": b"x" * BIG, "ba": bytearray(b"y" * BIG), "mv": memoryview(b"z" * BIG),
               "nested": [{"deep": (b"w" * BIG, 3)}], "small": b"tiny"}
    parts = encode_binary_parts(run_frame(payload))
    big_parts = [part for part in parts if len(part) == BIG]
    assert len(big_parts) == 4, "each large buffer is its own part"
    assert all(isinstance(part, memoryview) for part in big_parts), "views of the values, not copies"
    assert sum(len(part) for part in parts) < 4 * BIG + 4096
    args = decode_command(b"".join(parts))["args"]
    assert args["b"] == payload["b"] and type(args["b"]) is bytes
    assert args["ba"] == payload["ba"] and type(args["ba"]) is bytearray
    assert isinstance(args["mv"], memoryview) and args["mv"] == payload["mv"]
    assert args["nested"] == payload["nested"] and args["small"] == b"tiny"


def test_memoryviews_keep_their_format_and_shape() -> None:
    matrix = memoryview(bytearray(8 * 6)).cast("d", [2, 3])
    strided = memoryview(b"abcdefgh" * 4096)[::2]
    args = decode_command(encode_frame(run_frame({"m": matrix, "s": strided}), binary=True))["args"]
    assert args["m"].format == "d" and args["m"].shape == (2, 3) and args["m"].tolist() == matrix.tolist()
    assert args["s"].tobytes() == strided.tobytes()


def test_numpy_arrays_arrive_as_read_only_views_of_the_frame() -> None:
    array = np.arange(BIG // 8, dtype=np.float64).reshape(256, -1)
    data = encode_frame(run_frame({"a": array, "f": np.asfortranarray(array)}), binary=True)
    assert len(data) < 2 * array.nbytes + 4096
    args = decode_command(data)["args"]
    assert np.array_equal(args["a"], array) and args["a"].dtype == array.dtype
    assert np.array_equal(args["f"], array)
    assert not args["a"].flags.writeable, "a view of the received bytes (copy it to change it)"


def test_results_errors_items_and_logs_round_trip_as_binary_events() -> None:
    try:
        raise tasks.ContractTaskError("boom")
    except tasks.ContractTaskError as exc:
        error = exc
    events: list[dict[str, Any]] = [
        {"type": "task_started", "run_id": "r:1", "task_id": "r"},
        {"type": "task_yield", "run_id": "r:1", "task_id": "r", "seq": 0, "item": bytearray(BIG)},
        {"type": "task_result", "run_id": "r:1", "task_id": "r", "result": {"data": b"r" * BIG}},
        {"type": "task_error", "run_id": "r:2", "task_id": "r", "exception": error,
         "error": {"kind": "ContractTaskError", "message": "boom", "traceback": "", "retryable": False,
                   "source": "task"}},
        {"type": "log", "message": "hello"},
    ]
    decoded = decode_events(encode_events(events, binary=True))
    assert [e["type"] for e in decoded] == [e["type"] for e in events]
    assert decoded[1]["item"] == bytearray(BIG) and decoded[2]["result"] == {"data": b"r" * BIG}
    assert isinstance(decoded[3]["exception"], tasks.ContractTaskError) and decoded[3]["error"]["message"] == "boom"


def test_an_unpicklable_result_becomes_a_task_error_in_binary_too() -> None:
    event = {"type": "task_result", "run_id": "r:1", "task_id": "r", "result": {"lock": threading.Lock()}}
    (decoded,) = decode_events(encode_event(event, binary=True))
    assert decoded["type"] == "task_error" and "cannot be sent back" in decoded["error"]["message"]
    with pytest.raises(DispatchError, match=r"Task 'echo': Cannot pickle args\['lock'\]"):
        encode_frame(run_frame({"lock": threading.Lock()}), binary=True)


@pytest.mark.parametrize("mangle, match", [
    (lambda d: d[:-1], "truncated"),
    (lambda d: d[:10], "starts with 16 bytes"),
    (lambda d: BINARY_MAGIC + struct.pack("!IQ", 5, 0) + b"nope!", "not valid JSON"),
    (lambda d: BINARY_MAGIC + struct.pack("!IQ", 2, 0) + b"[]", "must be a JSON object"),
    (lambda d: d + b"\x00WV", "starts with 16 bytes"),
])
def test_bad_binary_frames_raise_protocol_errors(mangle: Any, match: str) -> None:
    data = encode_frame({"type": "task_result", "run_id": "r:1", "task_id": "r", "result": 1}, binary=True)
    with pytest.raises(ProtocolError, match=match):
        decode_events(mangle(data))


def _reframe(header: dict[str, Any], body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return BINARY_MAGIC + struct.pack("!IQ", len(text), len(body)) + text + body


@pytest.mark.parametrize("pickles, match", [
    ({"result_pickle": [3]}, "add up to"),
    ({"result_pickle": "abc"}, "list of non-negative integers"),
    ({"result_pickle": [-1, 5]}, "list of non-negative integers"),
    ({"secret_pickle": [1]}, "unknown pickled field"),
    ([], "must be an object"),
])
def test_a_pickles_table_that_does_not_match_the_body_is_refused(pickles: Any, match: str) -> None:
    header = {"type": "task_result", "run_id": "r:1", "task_id": "r", "pickles": pickles}
    with pytest.raises(ProtocolError, match=match):
        decode_events(_reframe(header, b"\x80\x05N."))


def test_a_pickle_that_does_not_load_is_a_task_error_not_a_crash() -> None:
    header = {"type": "task_result", "run_id": "r:1", "task_id": "r", "pickles": {"result_pickle": [4]}}
    (event,) = decode_events(_reframe(header, b"junk"))
    assert event["type"] == "task_error" and "does not unpickle" in event["error"]["message"]


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_after_the_magic_raise_only_protocol_errors(tail: bytes) -> None:
    try:
        decode_events(BINARY_MAGIC + tail)
    except ProtocolError:
        pass


def test_services_announce_binary_frames_and_sessions_answer_in_kind() -> None:
    assert CAPABILITY_BINARY_FRAMES in SERVICE_CAPABILITIES

    async def main() -> None:
        service = WorkerService(name="t")
        for binary in (False, True):
            session = service.session("test")
            await session.receive(encode_frame(run_frame({"value": b"v" * BIG}), binary=binary))
            events: list[bytes] = []
            while not any(b"task_result" in message for message in events):
                await session.wait()
                events += session.data_to_send("list")
            assert session.binary is binary
            assert all(is_binary(message) is binary for message in events)
            results = [e for message in events for e in decode_events(message) if e["type"] == "task_result"]
            assert results[0]["result"] == b"v" * BIG
        await service.shutdown()

    asyncio.run(main())


def test_the_payload_policy_refuses_and_warns_with_names(caplog: pytest.LogCaptureFixture) -> None:
    config = PAYLOAD_OPTIONS.validate({"max_message_bytes": 1000, "payload_warning_bytes": 100})
    policy = PayloadPolicy.from_config(config)
    frame = run_frame({})
    with pytest.raises(PayloadTooLargeError, match=r"task 'echo' .* is 2.0 KiB \(2000 bytes\), over the demo limit of "
                       r"1000 bytes; nothing was sent\. Raise executor_config\.max_message_bytes") as info:
        policy.check(frame, 2000, environment="e", executor="demo")
    assert (info.value.size, info.value.limit, info.value.setting) == (2000, 1000, "executor_config.max_message_bytes")
    with caplog.at_level(logging.WARNING, logger="wove.transport"):
        policy.check(frame, 500, environment="e", executor="demo")
        policy.check(frame, 50, environment="e", executor="demo")
    (record,) = caplog.records
    assert "task 'echo'" in record.getMessage() and "500 bytes" in record.getMessage()
    quiet = PayloadPolicy.from_config(PAYLOAD_OPTIONS.validate({"payload_warning_bytes": False}))
    assert quiet.warning_bytes is None and quiet.max_bytes == 256 * 1024 * 1024


def test_payload_options_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match=r"max_message_bytes must be a positive integer, got 0"):
        PAYLOAD_OPTIONS.validate({"max_message_bytes": 0})
    with pytest.raises(ValueError, match=r"payload_warning_bytes must be a positive integer \(bytes\) or false"):
        PAYLOAD_OPTIONS.validate({"payload_warning_bytes": True})
