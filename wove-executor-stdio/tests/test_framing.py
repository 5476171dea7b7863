"""The stdio framing: JSON lines and binary frames mixed on one stream, read both ways."""

from __future__ import annotations

import asyncio

import pytest

from wove.protocol import decode_events, encode_frame
from wove_executor_stdio import STREAM_LIMIT, FrameSplitter, Oversized, read_frame

BIG = bytes(range(256)) * 400  # 100 KiB: travels out of band in a binary frame


def _stream() -> tuple[bytes, list[dict[str, object]]]:
    """A stream of JSON lines and binary frames, and the events it holds in order."""
    events: list[dict[str, object]] = [
        {"type": "log", "message": "ready"},
        {"type": "task_result", "run_id": "a:1", "task_id": "a", "result": BIG},
        {"type": "task_result", "run_id": "b:1", "task_id": "b", "result": [bytearray(BIG), {"k": "v"}]},
        {"type": "log", "message": "between"},
        {"type": "task_result", "run_id": "c:1", "task_id": "c", "result": 3},
        {"type": "heartbeat", "run_id": "c:1", "task_id": "c"},
    ]
    data = (encode_frame(events[0]) + b"\n" + encode_frame(events[1], binary=True)
            + encode_frame(events[2], binary=True) + b"\n" + encode_frame(events[3]) + b"\n"
            + encode_frame(events[4], binary=True) + encode_frame(events[5]) + b"\n")
    return data, events


@pytest.mark.parametrize("chunk", [1, 7, 16, 4096, 1 << 30])
def test_splitter_yields_every_frame_whatever_the_chunks(chunk: int) -> None:
    data, expected = _stream()
    frames: list[bytes | bytearray] = []
    problems: list[str] = []
    splitter = FrameSplitter(frames.append, problems.append)
    for start in range(0, len(data), chunk):
        splitter.feed(data[start:start + chunk])
    splitter.close()
    assert problems == []
    events = [event for frame in frames if frame.strip() for event in decode_events(frame)]
    assert events == expected
    assert [isinstance(frame, bytearray) for frame in frames if frame.strip()] == [
        False, True, True, False, True, False]


def test_splitter_skips_bytes_that_only_look_binary_and_reports_a_cut_frame() -> None:
    frames: list[bytes | bytearray] = []
    problems: list[str] = []
    splitter = FrameSplitter(frames.append, problems.append)
    good = encode_frame({"type": "log", "message": "after"})
    splitter.feed(b"\x00not a binary frame at all\n" + good + b"\n")
    assert frames == [good] and len(problems) == 1 and "Not a binary frame" in problems[0]
    cut = encode_frame({"type": "log", "message": "x"}, binary=True)
    splitter.feed(cut[:-3])
    splitter.close()
    assert frames == [good] and "ended inside a binary frame" in problems[1]


async def test_read_frame_reads_lines_and_binary_frames_and_skips_oversized_ones() -> None:
    data, expected = _stream()
    oversized = encode_frame({"type": "run_task", "run_id": "big:1", "task_id": "big", "callable": len,
                              "args": {"data": b"z" * (3 * STREAM_LIMIT)}}, binary=True)
    reader = asyncio.StreamReader(limit=STREAM_LIMIT)
    reader.feed_data(data + oversized + b"tail")
    reader.feed_eof()
    frames = []
    while (frame := await read_frame(reader, max_binary_bytes=2 * STREAM_LIMIT)) is not None:
        frames.append(frame)
    skipped = [frame for frame in frames if isinstance(frame, Oversized)]
    assert len(skipped) == 1 and skipped[0].size == len(oversized) and b'"run_id":"big:1"' in skipped[0].header
    assert frames[-1] == b"tail"
    events = [event for frame in frames[:-2] if not isinstance(frame, Oversized) and frame.strip()
              for event in decode_events(frame)]
    assert events == expected
