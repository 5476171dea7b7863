"""The codec's caches and fast paths: the same wire format, and caching only what is safe."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from wove.errors import DispatchError
from wove.protocol import decode_command, decode_events, encode_event, encode_frame, pack_frame
from wove.testing import tasks

SCALE = 3
SHARED: list[int] = []


@pytest.fixture(autouse=True)
def by_value() -> Any:
    """Pickle this module's functions by value, like a script's (``__main__``) functions."""
    import sys

    import cloudpickle

    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    yield
    cloudpickle.unregister_pickle_by_value(module)


def run_frame(func: Any, args: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": "run_task", "run_id": "t:1", "task_id": "t", "callable": func,
            "args": {} if args is None else args, "delivery": {"delivery_orphan_policy": "cancel"}}


def _pickled(func: Any) -> str:
    """The ``callable_pickle`` the codec sends for ``func``."""
    text: str = pack_frame(run_frame(func))["callable_pickle"]
    return text


def _decoded(data: bytes) -> Any:
    return decode_command(data)["callable"]


def pure(x: int) -> int:
    return x * SCALE


def uses_shared() -> int:
    return len(SHARED)


def bumps_global() -> None:
    global SCALE
    SCALE += 1


@pytest.mark.parametrize("args", [{}, {"a": 1, "b": [1.5, "x", None, (b"y", {"k": True})]}, {"blob": b"z" * 100_000}])
def test_fast_pickles_decode_like_cloudpickle(args: dict[str, Any]) -> None:
    import base64

    import cloudpickle

    text = pack_frame(run_frame(tasks.add, args))["args_pickle"]
    assert cloudpickle.loads(base64.b64decode(text)) == args
    assert decode_command(encode_frame(run_frame(tasks.add, args)))["args"] == args


def test_other_arguments_round_trip_through_cloudpickle() -> None:
    class Point:
        def __init__(self) -> None:
            self.x = 1

    frame = run_frame(tasks.echo, {"value": Point()})
    assert decode_command(encode_frame(frame))["args"]["value"].x == 1
    with pytest.raises(DispatchError, match=r"Task 't'.*args\['cfg'\]\['lock'\]"):
        encode_frame(run_frame(tasks.echo, {"cfg": {"lock": threading.Lock()}}))


def test_callable_cache_reuses_only_unchanging_pickles() -> None:
    # importable, and by-value functions without mutable state: pickled once, then reused
    assert _pickled(tasks.add) is _pickled(tasks.add)
    assert _pickled(len) is _pickled(len)
    assert _pickled(pure) is _pickled(pure)

    # a function that reads a mutable global, closes over state, or assigns globals: pickled
    # afresh every time, so its pickle never carries stale state
    assert _pickled(uses_shared) is not _pickled(uses_shared)
    SHARED.append(1)
    try:
        assert _decoded(encode_frame(run_frame(uses_shared)))() == 1
    finally:
        SHARED.clear()
    counter = [0]

    def closure() -> list[int]:
        return counter

    assert _pickled(closure) is not _pickled(closure)
    assert _pickled(bumps_global) is not _pickled(bumps_global)


def test_callable_cache_sees_a_rebound_global() -> None:
    global SCALE
    before = _pickled(pure)
    SCALE = 30
    try:
        after = _pickled(pure)
        assert after != before
        assert decode_command(encode_frame(run_frame(pure, {"x": 2})))["callable"](2) == 60
    finally:
        SCALE = 3


def test_decoded_callables_are_reused_except_stateful_ones() -> None:
    wire = encode_frame(run_frame(pure))
    assert _decoded(wire) is _decoded(wire)
    for stateful in (bumps_global, lambda: SHARED):
        wire = encode_frame(run_frame(stateful))
        assert _decoded(wire) is not _decoded(wire), stateful


@pytest.mark.parametrize("event", [
    {"type": "task_started", "run_id": "t:1", "task_id": "t"},
    {"type": "task_result", "run_id": "t:1", "task_id": "t", "result": {"a": [1, 2.5, b"x"]}},
    {"type": "task_result", "run_id": "t:1", "task_id": "t", "result": tasks.ContractTaskError("as a value")},
    {"type": "log", "message": "hello"},
])
def test_events_round_trip(event: dict[str, Any]) -> None:
    [decoded] = decode_events(encode_event(event))
    if isinstance(event.get("result"), Exception):
        assert type(decoded["result"]) is type(event["result"])
    else:
        assert decoded == event
    assert json.loads(encode_event(event))["type"] == event["type"]


@pytest.mark.parametrize("ids", [("t:1", "t"), ('qu"ote\\:1', "t\n"), ("ü:1", "ü")])
@pytest.mark.parametrize("result", [5, None, {"a": [1, 2.5, b"x"]}, tasks.ContractTaskError("as a value")])
def test_the_usual_result_event_is_encoded_as_the_general_encoder_does(ids: tuple[str, str], result: Any) -> None:
    run_id, task_id = ids
    engine_shaped = {"type": "task_result", "result": result, "run_id": run_id, "task_id": task_id}
    other_order = {"type": "task_result", "run_id": run_id, "task_id": task_id, "result": result}  # general path
    fast, general = encode_event(engine_shaped), encode_event(other_order)
    assert fast == general  # byte for byte
    assert list(json.loads(fast)) == ["type", "run_id", "task_id", "result_pickle"]
    [decoded] = decode_events(fast)
    assert decoded["run_id"] == run_id and decoded["task_id"] == task_id


def test_an_unpicklable_usual_result_still_becomes_a_task_error() -> None:
    [event] = decode_events(encode_event({"type": "task_result", "result": threading.Lock(), "run_id": "t:1",
                                          "task_id": "t"}))
    assert event["type"] == "task_error" and "cannot be sent back" in event["error"]["message"]


def triple(x: int) -> int:
    return x * 3


def test_the_usual_command_decodes_as_the_general_path_does() -> None:
    wire = encode_frame(run_frame(triple, {"x": 2}))
    first = decode_command(wire)  # the callable is new: the general path decodes (and caches) it
    again = decode_command(wire)  # now the usual command's fast path
    assert again == first and again["callable"] is first["callable"] and again["callable"](**again["args"]) == 6
    assert set(again) == {"type", "run_id", "task_id", "delivery", "callable", "args"}


@pytest.mark.parametrize(("args_pickle", "error"), [
    ("bm90IGEgcGlja2xl", "does not unpickle"),  # base64 of b"not a pickle"
    ("gAVLBy4=", "must unpickle to a dict"),  # pickle of 7
    (7, "must be a base64 string"),
])
def test_a_usual_looking_command_with_bad_arguments_gets_the_general_error(args_pickle: Any, error: str) -> None:
    from wove.errors import ProtocolError

    good = json.loads(encode_frame(run_frame(triple, {"x": 2})))
    decode_command(dict(good))  # the callable is cached: the fast path is taken first
    with pytest.raises(ProtocolError, match=error) as caught:
        decode_command({**good, "args_pickle": args_pickle})
    assert caught.value.run_id == "t:1"  # type: ignore[attr-defined]


UNPICKLED: list[int] = []


def _counted() -> int:
    UNPICKLED.append(1)
    return 7


class CountsItsUnpickling:
    def __reduce__(self) -> Any:
        return (_counted, ())


def test_usual_looking_arguments_are_unpickled_once_even_when_refused() -> None:
    import base64
    import sys

    import cloudpickle

    from wove.errors import ProtocolError

    good = json.loads(encode_frame(run_frame(triple, {"x": 2})))
    decode_command(dict(good))  # the callable is cached: the fast path is taken first
    module = sys.modules[__name__]
    cloudpickle.unregister_pickle_by_value(module)  # by reference: the count is this module's own list
    try:
        counted = base64.b64encode(cloudpickle.dumps(CountsItsUnpickling())).decode("ascii")
    finally:
        cloudpickle.register_pickle_by_value(module)
    UNPICKLED.clear()
    with pytest.raises(ProtocolError, match="must unpickle to a dict of keyword arguments, got int"):
        decode_command({**good, "args_pickle": counted})
    assert UNPICKLED == [1]
