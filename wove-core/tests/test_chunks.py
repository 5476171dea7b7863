"""wove.framing's binary chunks: a large binary frame cut into messages and assembled back,
refusals before allocation, and capability lists."""

from __future__ import annotations

import os
import tracemalloc

import pytest

from wove.errors import ProtocolError
from wove.framing import ChunkAssembler, capability_names, chunks
from wove.protocol import (
    BINARY_PREFIX_BYTES,
    SplitFrame,
    decode_command,
    decode_events,
    encode_binary_parts,
)

pytestmark = pytest.mark.timeout(30)


def frame_parts(size: int) -> tuple[list[bytes | memoryview], bytes]:
    blob = os.urandom(size)
    parts = encode_binary_parts({"type": "task_result", "run_id": "r", "task_id": "t", "result": blob})
    return parts, blob


@pytest.mark.parametrize(("size", "chunk"), [
    (1000, BINARY_PREFIX_BYTES), (1000, 4096), (64 * 1024, BINARY_PREFIX_BYTES), (64 * 1024, 4096),
    (64 * 1024, 256 * 1024), (3 * 1024 * 1024 + 7, 4096), (3 * 1024 * 1024 + 7, 256 * 1024),
])
def test_chunks_cut_a_frame_into_messages_of_the_size_and_the_assembler_rebuilds_it(size: int, chunk: int) -> None:
    parts, blob = frame_parts(size)
    whole = b"".join(parts)
    messages = list(chunks(parts, chunk))
    assert all(len(message) == chunk for message in messages[:-1]) and 0 < len(messages[-1]) <= chunk
    assert b"".join(messages) == whole
    assembler = ChunkAssembler()
    out = [assembler.feed(message) for message in messages]
    if len(messages) == 1:
        assert out == [messages[0]]  # a whole frame passes as it is
    else:
        assert out[:-1] == [None] * (len(messages) - 1) and assembler.pending == 0
    assert bytes(out[-1]) == whole  # type: ignore[arg-type]
    assert decode_events(out[-1])[0]["result"] == blob  # type: ignore[arg-type]
    by_segment = ChunkAssembler(by_segment=True)
    *_, last = [by_segment.feed(message) for message in messages]
    assert last is not None and len(last) == len(whole) and by_segment.pending == 0
    if chunk < len(parts[0]):  # the first chunk lacks the whole header: one buffer, the frame's bytes
        assert bytes(last) == whole  # type: ignore[arg-type]
    elif len(messages) > 1:  # kept by segment; bytes() joins it again
        assert isinstance(last, SplitFrame) and bytes(last) == whole
    assert decode_events(last)[0]["result"] == blob


def test_other_messages_pass_unchanged_and_the_assembler_is_reusable() -> None:
    assembler = ChunkAssembler()
    assert assembler.feed(b'{"type":"x"}') == b'{"type":"x"}'
    assert assembler.feed(b"[]") == b"[]"
    assert assembler.feed(b"\x00W") == b"\x00W"  # too short to be a chunk: the parser reports it
    parts, _ = frame_parts(100_000)
    for _round in range(2):
        results = [assembler.feed(message) for message in chunks(parts, 30_000)]
        assert results[-1] == b"".join(parts)


def test_a_refused_frame_raises_at_once_before_allocating() -> None:
    parts, _ = frame_parts(2 * 1024 * 1024)
    sizes: list[int] = []

    def refuse(size: int) -> None:
        sizes.append(size)
        raise ValueError(f"{size} bytes is over the limit")

    assembler = ChunkAssembler(refuse)
    messages = list(chunks(parts, 512 * 1024))
    with pytest.raises(ValueError, match="over the limit"):
        assembler.feed(messages[0])
    assert sizes == [sum(map(len, messages))] and assembler.pending == 0


def test_drop_refused_reads_the_frame_to_its_end_then_raises() -> None:
    parts, _ = frame_parts(2 * 1024 * 1024)
    messages = list(chunks(parts, 512 * 1024))

    def refuse(size: int) -> None:
        raise ValueError("too large")

    assembler = ChunkAssembler(refuse, drop_refused=True)
    assert [assembler.feed(message) for message in messages[:-1]] == [None] * (len(messages) - 1)
    assert assembler.pending
    with pytest.raises(ValueError, match="too large"):
        assembler.feed(messages[-1])
    assert assembler.pending == 0 and assembler.feed(b"{}") == b"{}"


def test_a_chunk_past_the_end_of_its_frame_is_a_protocol_error() -> None:
    parts, _ = frame_parts(100_000)
    messages = list(chunks(parts, 60_000))
    assembler = ChunkAssembler()
    assert assembler.feed(messages[0]) is None
    with pytest.raises(ProtocolError, match="runs past the end"):
        assembler.feed(messages[1] + b"extra")
    assert assembler.pending == 0


def test_a_chunk_size_below_the_prefix_is_refused() -> None:
    with pytest.raises(ValueError, match="prefix"):
        list(chunks([b"x" * 100], 8))


@pytest.mark.parametrize(("value", "names"), [
    ("binary_frames, task_yield", {"binary_frames", "task_yield"}),
    (b"binary_chunks,command_lists ,", {"binary_chunks", "command_lists"}),
    ("", set()), (None, set()),
])
def test_capability_names(value: object, names: set[str]) -> None:
    assert capability_names(value) == frozenset(names)


def test_a_large_bytes_value_of_a_chunked_frame_unpickles_without_a_copy() -> None:
    """Kept by segment, the value's buffer is the value: decoding a 4 MiB result allocates
    far less than 4 MiB (in one buffer for the whole frame it would take a second 4 MiB)."""
    parts, blob = frame_parts(4 * 1024 * 1024)
    assembler = ChunkAssembler(by_segment=True)
    *_, last = [assembler.feed(message) for message in chunks(parts, 256 * 1024)]
    assert isinstance(last, SplitFrame)
    tracemalloc.start()
    try:
        [event] = decode_events(last)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert event["result"] == blob and type(event["result"]) is bytes
    assert peak < len(blob) // 4, peak


def test_a_chunked_command_with_several_buffers_keeps_each_value() -> None:
    """Several pickled fields and out-of-band buffers, and chunks that end inside and exactly
    at segment boundaries: every value comes back, bytearray and memoryview as their kinds."""
    big, other = os.urandom(300_000), bytearray(os.urandom(200_000))
    view = memoryview(os.urandom(120_000))
    frame = {"type": "run_task", "run_id": "r:1", "task_id": "r", "callable": len,
             "args": {"big": big, "other": other, "view": view, "small": b"x" * 10}, "delivery": {}}
    parts = encode_binary_parts(frame)
    for size in (len(parts[0]), 100_000, 65_536, 299_999):
        assembler = ChunkAssembler(by_segment=True)
        *_, last = [assembler.feed(message) for message in chunks(parts, size)]
        command = decode_command(last)  # type: ignore[arg-type]
        args = command["args"]
        assert args["big"] == big and type(args["big"]) is bytes
        assert args["other"] == other and type(args["other"]) is bytearray
        assert bytes(args["view"]) == bytes(view) and args["small"] == b"x" * 10
