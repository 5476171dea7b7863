"""The codec's caches and fast paths: the same wire format, and caching only what is safe."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from wove._codec_cache import CallableCache, DecodedCallables, fast_b64
from wove.errors import DispatchError
from wove.protocol import decode_command, decode_events, encode_event, encode_frame
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

    text = fast_b64(args)
    assert text is not None
    assert cloudpickle.loads(base64.b64decode(text)) == args
    assert decode_command(encode_frame(run_frame(tasks.add, args)))["args"] == args


def test_other_arguments_take_the_cloudpickle_path() -> None:
    class Point:
        def __init__(self) -> None:
            self.x = 1

    frame = run_frame(tasks.echo, {"value": Point()})
    assert fast_b64(frame["args"]) is None
    assert decode_command(encode_frame(frame))["args"]["value"].x == 1
    with pytest.raises(DispatchError, match=r"Task 't'.*args\['cfg'\]\['lock'\]"):
        encode_frame(run_frame(tasks.echo, {"cfg": {"lock": threading.Lock()}}))


def test_callable_cache_reuses_only_unchanging_pickles() -> None:
    cache = CallableCache()
    # importable, and by-value functions without mutable state: cached
    assert cache.encode(tasks.add) is cache.encode(tasks.add)
    assert cache.encode(len) is cache.encode(len)
    first = cache.encode(pure)
    assert first is not None and cache.encode(pure) is first

    # a function that reads a mutable global, closes over state, or assigns globals: never cached
    assert cache.encode(uses_shared) is None
    counter = [0]
    assert cache.encode(lambda: counter) is None
    assert cache.encode(bumps_global) is None


def test_callable_cache_sees_a_rebound_global() -> None:
    global SCALE
    cache = CallableCache()
    before = cache.encode(pure)
    SCALE = 30
    try:
        after = cache.encode(pure)
        assert after != before
        assert decode_command(encode_frame(run_frame(pure, {"x": 2})))["callable"](2) == 60
    finally:
        SCALE = 3


def test_decoded_callables_skip_stateful_functions() -> None:
    cache = DecodedCallables()
    cache.remember("a", pure)
    cache.remember("b", bumps_global)
    cache.remember("c", lambda: SHARED)
    assert cache.get("a") is pure
    assert cache.get("b") is None and cache.get("c") is None


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
