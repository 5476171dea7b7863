"""wove.framing: a byte stream of JSON lines and binary frames, and which frames go binary."""

from __future__ import annotations

import functools
import threading
from typing import Any

import numpy as np
import pytest

from wove.framing import BULKY_BYTES, FrameSplitter, worth_binary
from wove.protocol import SplitFrame, decode_events, encode_event
from wove.testing import tasks


def split(stream: bytes, size: int, *, by_segment: bool = False
          ) -> tuple[list[bytes | bytearray | SplitFrame], list[str]]:
    frames: list[bytes | bytearray | SplitFrame] = []
    problems: list[str] = []
    splitter = FrameSplitter(frames.append, problems.append, by_segment=by_segment)
    for offset in range(0, len(stream), size):
        splitter.feed(stream[offset:offset + size])
    splitter.close()
    return frames, problems


@pytest.mark.parametrize("by_segment", [False, True], ids=["whole", "by-segment"])
@pytest.mark.parametrize("size", [1, 7, 4096, 1 << 20])
def test_the_splitter_reads_lines_and_frames_in_any_mix(size: int, by_segment: bool) -> None:
    big = {"type": "task_result", "run_id": "r:1", "task_id": "r", "result": b"\n" * 40_000}
    started = {"type": "task_started", "run_id": "r:1", "task_id": "r"}
    stream = (encode_event(started) + b"\n" + encode_event(big, binary=True) + b"\n"
              + encode_event(started, binary=True) + encode_event(big) + b"\n" + encode_event(started))
    frames, problems = split(stream, size, by_segment=by_segment)
    assert not problems
    # by segment, a binary frame that spans reads whose first read holds its header comes
    # as a SplitFrame (reads of 4096 bytes); a frame within one read, or one whose header
    # came in pieces (reads of 1 or 7 bytes), as bytes
    assert any(isinstance(frame, SplitFrame) for frame in frames) == (by_segment and size == 4096)
    events = [event for frame in frames if isinstance(frame, SplitFrame) or frame.strip()
              for event in decode_events(frame)]
    assert [event["type"] for event in events] == ["task_started", "task_result", "task_started", "task_result",
                                                   "task_started"]
    assert events[1]["result"] == events[3]["result"] == big["result"]


def test_a_stream_that_ends_inside_a_binary_frame_is_reported() -> None:
    frame = encode_event({"type": "task_result", "run_id": "r:1", "task_id": "r", "result": b"x" * 100}, binary=True)
    frames, problems = split(frame[:-1], 1 << 20)
    assert frames == [] and problems and "ended inside a binary frame" in problems[0]


def test_bytes_that_only_look_binary_are_skipped_to_the_next_line() -> None:
    line = encode_event({"type": "task_started", "run_id": "r:1", "task_id": "r"})
    frames, problems = split(b"\x00garbage that is no frame\n" + line + b"\n", 5)
    assert frames == [line] and len(problems) == 1 and "skipped to the next line" in problems[0]


def test_small_frames_stay_json_and_bulky_ones_go_binary() -> None:
    def run(fn: Any = tasks.add, **args: Any) -> dict[str, Any]:
        return {"type": "run_task", "run_id": "r:1", "task_id": "r", "callable": fn, "args": args, "delivery": {}}

    def result(value: Any) -> dict[str, Any]:
        return {"type": "task_result", "run_id": "r:1", "task_id": "r", "result": value}

    big = b"x" * (BULKY_BYTES + 1)
    assert not worth_binary(run(a=1, b="two")) and not worth_binary(result(3))
    assert not worth_binary({"type": "task_started", "run_id": "r:1", "task_id": "r"})
    assert worth_binary(run(a=big)) and worth_binary(result({"nested": [big]}))
    assert worth_binary(result(bytearray(10))) and worth_binary(result(np.zeros(3)))
    assert worth_binary(result(list(range(1000)))), "a large container"
    assert worth_binary(run(functools.partial(tasks.echo, big)))  # the callable carries data
    lock = threading.Lock()
    assert worth_binary(result(lock)), "any other object may hold anything"
