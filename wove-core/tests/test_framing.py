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
    # by segment, a binary frame that spans reads comes as a SplitFrame, however the reads
    # cut its prefix and header (reads of 1, 7 or 4096 bytes); a frame within one read as bytes
    assert any(isinstance(frame, SplitFrame) for frame in frames) == (by_segment and size < 1 << 20)
    events = [event for frame in frames if isinstance(frame, SplitFrame) or frame.strip()
              for event in decode_events(frame)]
    assert [event["type"] for event in events] == ["task_started", "task_result", "task_started", "task_result",
                                                   "task_started"]
    assert events[1]["result"] == events[3]["result"] == big["result"]


@pytest.mark.parametrize("by_segment", [False, True], ids=["whole", "by-segment"])
def test_a_stream_that_ends_inside_a_binary_frame_is_reported(by_segment: bool) -> None:
    frame = encode_event({"type": "task_result", "run_id": "r:1", "task_id": "r", "result": b"x" * 100}, binary=True)
    for cut in (20, 40, len(frame) - 1):  # in the header, past it, at the last byte
        frames, problems = split(frame[:cut], 7, by_segment=by_segment)
        assert frames == [] and problems and "ended inside a binary frame" in problems[0], cut


def test_a_frame_with_a_bad_pickles_table_reaches_the_parser_whole_by_segment() -> None:
    frame = encode_event({"type": "task_result", "run_id": "r:1", "task_id": "r", "result": b"x" * 40_000}, binary=True)
    bad = frame.replace(b'"pickles"', b'"pickleZ"', 1)
    frames, problems = split(bad, 4096, by_segment=True)
    assert not problems and len(frames) == 1 and isinstance(frames[0], bytearray) and bytes(frames[0]) == bad


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
