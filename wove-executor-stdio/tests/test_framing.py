"""The stdio framing: JSON lines and binary frames mixed on one stream, read by the worker
(``read_frame``; the executor's ``FrameSplitter`` is wove.framing's, tested in wove-core)."""

from __future__ import annotations

import asyncio

from wove.protocol import decode_events, encode_frame
from wove_executor_stdio import STREAM_LIMIT, Oversized, read_frame

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
