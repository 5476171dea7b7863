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
from wove.protocol import BINARY_PREFIX_BYTES, binary_frame_size

__all__ = [
    "BINARY_START",
    "DIRECT_WRITE_BYTES",
    "READY_KEY",
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

#: Field of the worker's first ``log`` event that tells the executor the worker is ready.
READY_KEY = "wove_stdio_ready"

#: StreamReader limit: a line longer than this is assembled in pieces; reading pauses
#: at twice this much unread data.
STREAM_LIMIT = 1 << 20

#: The first byte of a binary frame (JSON never starts with it).
BINARY_START = b"\x00"

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


class FrameSplitter:
    """Splits bytes as they arrive from a pipe into frames, JSON lines and binary frames
    mixed (for a protocol's ``data_received``; no reader task).

    Args:
        on_frame: called with each complete frame: a JSON line (bytes without ``\\n``)
            or a binary frame (a bytearray of exactly its size).
        on_error: called with a description when bytes start like a binary frame but
            are not one; they are dropped up to the next newline.
    """

    def __init__(self, on_frame: Callable[[bytes | bytearray], None], on_error: Callable[[str], None]) -> None:
        self._on_frame = on_frame
        self._on_error = on_error
        self._line = bytearray()  # the start of a JSON line (or of a binary prefix)
        self._binary: bytearray | None = None  # the binary frame being filled
        self._filled = 0
        self._skip_line = False  # dropping bytes up to the next newline

    @property
    def pending(self) -> int:
        """Bytes of an unfinished frame held."""
        return self._filled if self._binary is not None else len(self._line)

    def feed(self, data: bytes) -> None:
        """Take the next bytes of the stream; complete frames go to ``on_frame``."""
        view = memoryview(data)
        position, end = 0, len(data)
        while position < end:
            if self._binary is not None:
                position = self._fill(view, position)
                continue
            if self._skip_line:
                newline = data.find(b"\n", position)
                if newline < 0:
                    return
                self._skip_line = False
                position = newline + 1
                continue
            if not self._line and data[position] == 0:
                position = self._start_binary(view, position)
                continue
            if self._line[:1] == BINARY_START:
                position = self._prefix(view, position)
                continue
            newline = data.find(b"\n", position)
            if newline < 0:
                self._line += view[position:]
                return
            if self._line:
                self._line += view[position:newline]
                line = bytes(self._line)
                self._line.clear()
            else:
                line = data[position:newline]
            position = newline + 1
            self._on_frame(line)

    def _start_binary(self, view: memoryview, position: int) -> int:
        """A binary frame starts at ``position``: take it whole when it is all here."""
        if len(view) - position < BINARY_PREFIX_BYTES:
            return self._prefix(view, position)
        try:
            size = binary_frame_size(view[position:position + BINARY_PREFIX_BYTES])
        except ProtocolError:
            return self._prefix(view, position)  # reports it
        if position + size <= len(view):
            self._on_frame(bytearray(view[position:position + size]))
            return position + size
        self._binary = bytearray(size)
        self._filled = 0
        return self._fill(view, position)

    def _prefix(self, view: memoryview, position: int) -> int:
        need = BINARY_PREFIX_BYTES - len(self._line)
        taken = view[position:position + need]
        self._line += taken
        position += len(taken)
        if len(self._line) < BINARY_PREFIX_BYTES:
            return position
        prefix = bytes(self._line)
        self._line.clear()
        try:
            size = binary_frame_size(prefix)
        except ProtocolError as exc:
            self._on_error(f"{exc}; skipped to the next line")
            newline = prefix.find(b"\n")
            if newline < 0:
                self._skip_line = True
            else:  # the next line started inside these bytes
                self.feed(prefix[newline + 1:])
            return position
        self._binary = bytearray(size)
        self._binary[:BINARY_PREFIX_BYTES] = prefix
        self._filled = BINARY_PREFIX_BYTES
        return self._complete(position)

    def _fill(self, view: memoryview, position: int) -> int:
        assert self._binary is not None
        taken = view[position:position + len(self._binary) - self._filled]
        self._binary[self._filled:self._filled + len(taken)] = taken
        self._filled += len(taken)
        return self._complete(position + len(taken))

    def _complete(self, position: int) -> int:
        frame = self._binary
        if frame is not None and self._filled == len(frame):
            self._binary = None
            self._filled = 0
            self._on_frame(frame)
        return position

    def close(self) -> None:
        """The stream ended: a last line without its newline is a frame; an unfinished
        binary frame is reported to ``on_error`` and dropped."""
        if self._binary is not None:
            self._on_error(f"the stream ended inside a binary frame: {self._filled} of its "
                           f"{len(self._binary)} bytes arrived")
            self._binary = None
        elif self._line[:1] == BINARY_START:
            self._on_error(f"the stream ended inside a binary frame's prefix ({len(self._line)} bytes arrived)")
        elif self._line and not self._skip_line:
            self._on_frame(bytes(self._line))
        self._line.clear()
        self._filled = 0

