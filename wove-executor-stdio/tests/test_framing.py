"""The stdio framing: JSON lines and binary frames mixed on one stream, read by the worker
(``PipeReader`` / ``FrameReader``, or ``read_frame`` off a regular file; the executor's
``FrameSplitter`` is wove.framing's, tested in wove-core)."""

from __future__ import annotations

import asyncio
import os

import pytest

from wove.protocol import SplitFrame, decode_events, encode_frame
from wove_executor_stdio import (
    REUSE_BYTES,
    STREAM_LIMIT,
    Frame,
    FrameReader,
    Oversized,
    PipeReader,
    read_frame,
)

SCRATCH = 64 * 1024  # what a FrameReader reads at once outside binary frames

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


def _read_in_chunks(data: bytes, sizes: list[int], *, max_binary_bytes: int | None = None,
                    ) -> list[Frame]:
    """Drive a FrameReader as a pipe would: each read fills at most ``sizes[i]`` bytes of
    the buffer it hands out (cycling through ``sizes``)."""
    frames: list[Frame] = []
    reader = FrameReader(frames.append, max_binary_bytes=max_binary_bytes)
    _drive(reader, data, sizes)
    assert reader.close()
    return frames


def _drive(reader: FrameReader, data: bytes, sizes: list[int]) -> None:
    position, turn = 0, 0
    while position < len(data):
        buffer = reader.get_buffer()
        count = min(len(buffer), sizes[turn % len(sizes)], len(data) - position)
        buffer[:count] = data[position:position + count]
        buffer.release()
        reader.buffer_updated(count)
        position += count
        turn += 1


def _events(frames: list[Frame]) -> list[dict[str, object]]:
    return [event for frame in frames
            if isinstance(frame, SplitFrame) or (not isinstance(frame, Oversized) and frame.strip())
            for event in decode_events(frame if isinstance(frame, SplitFrame) else bytes(frame))]


def test_frame_reader_splits_lines_and_binary_frames_at_every_chunk_boundary() -> None:
    data, expected = _stream()
    assert _events(_read_in_chunks(data, [len(data)])) == expected
    for size in (1, 2, 3, 7, 15, 16, 17, 4096):
        assert _events(_read_in_chunks(data, [size])) == expected, size
    for cut in range(1, 200):  # every boundary in the head of the stream, then large reads
        assert _events(_read_in_chunks(data, [cut, 1 << 20])) == expected, cut
    frames: list[Frame] = []
    reader = FrameReader(frames.append)
    for start in range(0, len(data), 333):  # bytes read elsewhere, fed in
        reader.feed(data[start:start + 333])
    assert reader.close() and _events(frames) == expected


def test_frame_reader_skips_oversized_frames_and_passes_malformed_ones_on_as_lines() -> None:
    oversized = encode_frame({"type": "run_task", "run_id": "big:1", "task_id": "big", "callable": len,
                              "args": {"data": b"z" * (3 * STREAM_LIMIT)}}, binary=True)
    bogus = b"\x00WV\x09" + b"not a frame at all\n"
    data, expected = _stream()
    for sizes in ([1 << 20], [5], [SCRATCH, 100]):
        frames = _read_in_chunks(data + oversized + bogus + data + b"tail", sizes,
                                 max_binary_bytes=2 * STREAM_LIMIT)
        skipped = [frame for frame in frames if isinstance(frame, Oversized)]
        assert len(skipped) == 1 and skipped[0].size == len(oversized)
        assert b'"run_id":"big:1"' in skipped[0].header
        assert frames[-1] == b"tail"
        assert bogus[:-1] in frames
        assert _events([f for f in frames[:-1] if f != bogus[:-1]]) == expected + expected


def test_frame_reader_reads_a_100_mib_frame_into_a_buffer_per_segment_that_unpickles_without_a_copy() -> None:
    big = os.urandom(100 << 20)
    event = {"type": "task_result", "run_id": "a:1", "task_id": "a", "result": big}
    frames = _read_in_chunks(encode_frame(event, binary=True) + b'{"type":"log","message":"x"}\n', [1 << 20])
    frame = frames[0]
    assert isinstance(frame, SplitFrame)
    result = decode_events(frame)[0]["result"]
    assert result == big and any(result is piece for piece in frame.pieces)  # the buffer read into
    assert frames[1] == b'{"type":"log","message":"x"}'
    del frames, frame, result


LARGE = [os.urandom(REUSE_BYTES // 2), bytearray(os.urandom(REUSE_BYTES // 2 + 1)), {"small": b"s" * 10},
         memoryview(os.urandom(70_000)), b"t" * 5000]


def _large_stream() -> tuple[bytes, list[dict[str, object]]]:
    """Frames over REUSE_BYTES (several out-of-band buffers, large and short) among small ones."""
    events: list[dict[str, object]] = [
        {"type": "task_result", "run_id": "l:1", "task_id": "l", "result": LARGE},
        {"type": "log", "message": "between"},
        {"type": "task_result", "run_id": "m:1", "task_id": "m", "result": BIG},
        {"type": "task_result", "run_id": "n:1", "task_id": "n", "result": LARGE[::-1]},
    ]
    data = (encode_frame(events[0], binary=True) + encode_frame(events[1]) + b"\n"
            + encode_frame(events[2], binary=True) + encode_frame(events[3], binary=True))
    return data, [{**event, "result": _as_received(event["result"])} if "result" in event else event
                  for event in events]


def _as_received(value: object) -> object:
    """A result as it decodes: a memoryview comes back as bytes."""
    if isinstance(value, list):
        return [bytes(item) if isinstance(item, memoryview) else item for item in value]
    return value


@pytest.mark.parametrize("sizes", [[1 << 20], [SCRATCH], [SCRATCH - 1, 3, 70_001], [16], [17, 1 << 20],
                                   [100, 1 << 20], [1000, 7, 1 << 20]])
def test_frame_reader_reads_large_frames_by_segment_at_any_read_size(sizes: list[int]) -> None:
    data, expected = _large_stream()
    frames = _read_in_chunks(data, sizes)
    assert [type(frame) for frame in frames] == [SplitFrame, bytes, bytearray, SplitFrame]
    assert _events(frames) == expected
    fed: list[Frame] = []
    reader = FrameReader(fed.append)
    for start in range(0, len(data), 1 << 20):  # bytes read elsewhere, fed in
        reader.feed(data[start:start + (1 << 20)])
    assert reader.close() and _events(fed) == expected


def test_frame_reader_reports_a_stream_that_ends_inside_a_large_frame() -> None:
    data, _ = _large_stream()
    first = len(encode_frame({"type": "task_result", "run_id": "l:1", "task_id": "l", "result": LARGE}, binary=True))
    for cut in (20, 200, first // 2, first - 1):  # in the header, in a segment, at its last byte
        frames: list[Frame] = []
        reader = FrameReader(frames.append)
        _drive(reader, data[:cut], [1 << 20])
        assert not reader.close() and frames == []


def test_a_large_frame_with_a_bad_pickles_table_reaches_the_parser_whole() -> None:
    data, _ = _large_stream()
    bad = data.replace(b'"pickles"', b'"pickleZ"', 1)
    frames = _read_in_chunks(bad, [1 << 20])
    assert isinstance(frames[0], bytearray) and bytes(frames[0]) == bad[:len(frames[0])]


def test_frame_reader_reuses_only_buffers_nothing_holds() -> None:
    # small frames: a buffer still held (or viewed) by its consumer is never written over
    one = encode_frame({"type": "task_result", "run_id": "b:1", "task_id": "b", "result": BIG}, binary=True)
    two = encode_frame({"type": "task_result", "run_id": "c:1", "task_id": "c", "result": BIG[::-1]}, binary=True)
    held: list[Frame] = []
    reader = FrameReader(held.append)
    for data in (one, two, one):
        _drive(reader, data, [1 << 20])
    assert [decode_events(bytes(f))[0]["run_id"] for f in held if not isinstance(f, Oversized)] == ["b:1", "c:1", "b:1"]
    seen: list[str] = []

    def decode_and_drop(frame: Frame) -> None:
        assert isinstance(frame, bytearray)
        seen.append(decode_events(frame)[0]["run_id"])

    reader = FrameReader(decode_and_drop)
    for data in (one, two, one, two):  # the dropped buffer is used again: still right
        _drive(reader, data, [1 << 20])
        reader.feed(data)
    assert seen == ["b:1", "b:1", "c:1", "c:1", "b:1", "b:1", "c:1", "c:1"]


async def test_pipe_reader_reads_a_pipe_until_its_end() -> None:
    data, expected = _stream()
    read_end, write_end = os.pipe()
    try:
        reader = PipeReader(read_end)

        def write() -> None:
            for start in range(0, len(data), 50_000):
                os.write(write_end, data[start:start + 50_000])
            os.close(write_end)

        writing = asyncio.get_running_loop().run_in_executor(None, write)
        frames = []
        while (frame := await asyncio.wait_for(reader.next(), 10)) is not None:
            frames.append(frame)
        await writing
        assert _events(frames) == expected
    finally:
        os.close(read_end)
