"""Framing of the stdio streams, for frames of any size, and the ready signal (shared by
the executor and the worker program, so neither imports the other).

A stream carries two kinds of frames, mixed at any time: a JSON frame is one line ending
in ``\\n`` (the Wove 2.x wire format); a binary frame (docs/wire.md, "Binary frames")
starts with a NUL byte, which never starts JSON, and says its own length in its first
:data:`~wove.protocol.BINARY_PREFIX_BYTES` bytes; no newline follows it. A reader looks
at the first byte of the next frame to tell them apart.

``StreamReader.readline`` fails on a line longer than the reader's ``limit``; raising the
limit also raises the amount buffered before the pipe is paused. :func:`read_line` keeps
a modest limit (so flow control still works) and assembles longer lines piecewise; a
binary frame is read in pieces of at most that limit into one buffer of its own size.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from wove.errors import ProtocolError
from wove.framing import BINARY_START, FrameSplitter
from wove.protocol import BINARY_PREFIX_BYTES, binary_frame_size

__all__ = [
    "BINARY_START",
    "DIRECT_WRITE_BYTES",
    "READY_KEY",
    "READ_BINARY_ENV",
    "STREAM_LIMIT",
    "FrameSplitter",
    "Oversized",
    "Part",
    "nbytes",
    "read_frame",
    "read_line",
    "write_parts",
]

logger = logging.getLogger(__name__)

#: Set to ``1`` in a worker's environment by an executor that reads binary frames: the worker
#: then sends bulky events as binary frames from the start (a Wove 2.x worker ignores it).
READ_BINARY_ENV = "WOVE_STDIO_BINARY_FRAMES"
#: Field of the worker's first ``log`` event that tells the executor the worker is ready.
READY_KEY = "wove_stdio_ready"

#: StreamReader limit: a line longer than this is assembled in pieces; reading pauses
#: at twice this much unread data.
STREAM_LIMIT = 1 << 20

#: Parts of a frame at least this large are handed to the pipe as they are (no join).
DIRECT_WRITE_BYTES = 64 * 1024

#: One buffer of a frame written in parts.
Part = bytes | bytearray | memoryview


def nbytes(part: Part) -> int:
    """The size in bytes of one buffer (a memoryview's length counts items, not bytes)."""
    return part.nbytes if isinstance(part, memoryview) else len(part)


def write_parts(write: Callable[[Part], None], parts: Iterable[Part]) -> None:
    """Write ``parts`` in order: small neighbours joined into one write, each large part
    (a view of the caller's data) passed to ``write`` as it is.

    This is the vectored write of a pipe: asyncio's pipe transports have no ``writev``,
    and their ``writelines`` joins everything into one new buffer first (a full copy of a
    100 MiB argument); ``write`` sends what the pipe takes at once and copies only the rest
    into the transport's buffer.
    """
    small: list[Part] = []
    for part in parts:
        if nbytes(part) >= DIRECT_WRITE_BYTES:
            if small:
                write(small[0] if len(small) == 1 else b"".join(small))
                small = []
            write(part)
        elif part:
            small.append(part)
    if small:
        write(small[0] if len(small) == 1 else b"".join(small))


async def read_line(reader: asyncio.StreamReader, prefix: bytes = b"") -> bytes | None:
    """Return the next line without its ``\\n`` (of any length), or None at end of stream.

    A last line without a trailing newline is returned as a line. ``prefix`` (bytes the
    caller already took from the line) is put back at its start.
    """
    parts: list[bytes] = [prefix] if prefix else []
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as exc:
            # ``exc.consumed`` bytes hold no separator: take them out and look again.
            parts.append(await reader.readexactly(exc.consumed))
            continue
        except asyncio.IncompleteReadError as exc:
            parts.append(exc.partial)
            tail = b"".join(parts)
            return tail if tail else None
        if parts:
            parts.append(line[:-1])
            return b"".join(parts)
        return line[:-1]


@dataclass(frozen=True)
class Oversized:
    """A binary frame over the reader's limit, skipped without being kept.

    Attributes:
        size: the frame's whole size in bytes.
        header: its JSON header (the plain fields: ``type``, ``run_id``...), or b"" when
            the header itself was too large to keep.
    """

    size: int
    header: bytes


#: Largest header of an oversized frame that is kept to name its run.
_OVERSIZED_HEADER = 1 << 20


async def read_frame(reader: asyncio.StreamReader, *, max_binary_bytes: int | None = None,
                     ) -> bytes | bytearray | Oversized | None:
    """The next frame of the stream, or None at its end.

    A JSON frame comes back as its line (bytes, without ``\\n``; possibly blank); a binary
    frame as one bytearray of exactly its size (its pickled buffers are decoded as views
    of it); a binary frame larger than ``max_binary_bytes`` is read past without keeping
    it and comes back as :class:`Oversized`. A stream that ends inside a binary frame
    ends (None, with a warning). Bytes that start like a binary frame but are not one are
    returned up to the next newline, as a (malformed) line: the caller's decoder reports
    them, and reading goes on at the next line.
    """
    try:
        first = await reader.readexactly(1)
    except asyncio.IncompleteReadError:
        return None
    if first == b"\n":
        return b""
    if first != BINARY_START:
        return await read_line(reader, first) or b""
    try:
        prefix = first + await reader.readexactly(BINARY_PREFIX_BYTES - 1)
    except asyncio.IncompleteReadError as exc:
        logger.warning("stdio stream ended inside a binary frame's prefix (%d bytes arrived)", len(exc.partial) + 1)
        return None
    try:
        size = binary_frame_size(prefix)
    except ProtocolError:
        return await read_line(reader, prefix) or b""
    if max_binary_bytes is not None and size > max_binary_bytes:
        return await _skip(reader, prefix, size)
    frame = bytearray(size)
    view = memoryview(frame)
    view[:BINARY_PREFIX_BYTES] = prefix
    position = BINARY_PREFIX_BYTES
    while position < size:
        chunk = await reader.read(min(size - position, STREAM_LIMIT))
        if not chunk:
            logger.warning("stdio stream ended inside a binary frame: %d of its %d bytes arrived", position, size)
            return None
        view[position:position + len(chunk)] = chunk
        position += len(chunk)
    view.release()
    return frame


async def _skip(reader: asyncio.StreamReader, prefix: bytes, size: int) -> Oversized | None:
    header_size = int.from_bytes(prefix[4:8], "big")
    header = b""
    position = BINARY_PREFIX_BYTES
    if header_size <= _OVERSIZED_HEADER:
        try:
            header = await reader.readexactly(header_size)
        except asyncio.IncompleteReadError:
            return None
        position += header_size
    while position < size:
        chunk = await reader.read(min(size - position, STREAM_LIMIT))
        if not chunk:
            return None
        position += len(chunk)
    return Oversized(size, header)
