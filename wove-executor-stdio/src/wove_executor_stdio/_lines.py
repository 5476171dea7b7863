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
:class:`FrameReader` (``os.readv`` on a pipe) reads a frame into one buffer of its size,
or a large one straight into one buffer per segment.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from wove.errors import ProtocolError
from wove.framing import BINARY_START, FrameHead, FrameSegments, FrameSplitter
from wove.protocol import BINARY_PREFIX_BYTES, SplitFrame, binary_frame_size, binary_header_size

__all__ = [
    "BINARY_START",
    "DIRECT_WRITE_BYTES",
    "READY_KEY",
    "READ_BINARY_ENV",
    "REUSE_BYTES",
    "STREAM_LIMIT",
    "Frame",
    "FrameReader",
    "FrameSplitter",
    "Oversized",
    "Part",
    "PipeReader",
    "PipeWriter",
    "WriteEvents",
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
    header_size = binary_header_size(prefix)
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


#: Bytes a :class:`FrameReader` reads at once outside a binary frame (JSON lines, prefixes).
SCRATCH_BYTES = 64 * 1024
#: Largest binary frame whose buffer a :class:`FrameReader` keeps for the next frame; a
#: larger one is read into one buffer per segment.
REUSE_BYTES = 8 << 20

#: A frame as a :class:`FrameReader` hands it over.
Frame = bytes | bytearray | SplitFrame | Oversized

_refcount: Callable[[object], int] | None = getattr(sys, "getrefcount", None)


class FrameReader:
    """Splits a byte stream into frames, like :func:`read_frame`, reading each binary
    frame's body straight into its own buffers: ``get_buffer()`` says where the next bytes
    go, ``buffer_updated(n)`` takes the ``n`` bytes read there (the shape of
    :class:`asyncio.BufferedProtocol`, for ``os.readv`` on a pipe). A binary frame thus
    costs one copy (the kernel's, into the frame) instead of one per layer of buffering.

    Frames go to ``on_frame``: a JSON line as bytes without ``\\n`` (possibly blank), a
    binary frame up to :data:`REUSE_BYTES` as a bytearray of exactly its size, a larger one
    as a :class:`~wove.protocol.SplitFrame` (its body read into one ``bytes`` per pickle
    and out-of-band buffer, so a large ``bytes`` value unpickles as the buffer it was read
    into, without a copy), a binary frame over ``max_binary_bytes`` as :class:`Oversized`
    (read past without being kept). Bytes that start like a binary frame but are not one
    are passed on up to the next newline as a (malformed) line. The buffer of a frame up to
    :data:`REUSE_BYTES` is used again for a later frame once nothing refers to it any more
    (no fresh allocation, and page faults, per frame).
    """

    def __init__(self, on_frame: Callable[[Frame], None], *,
                 max_binary_bytes: int | None = None) -> None:
        self._on_frame = on_frame
        self._max = max_binary_bytes
        self._scratch = bytearray(SCRATCH_BYTES)
        self._line = bytearray()  # the start of a line, or of a binary prefix
        self._prefix = False  # ``_line`` holds the start of a binary prefix
        self._frame: bytearray | FrameSegments | None = None  # the binary frame being filled
        self._filled = 0
        self._head: FrameHead | None = None  # a large frame's head, until whole (then by segment)
        self._direct = False  # the last buffer handed out was the frame's
        self._skip = 0  # bytes of an oversized frame still to read past
        self._header = bytearray()  # its header, kept to name its run
        self._header_left = 0
        self._oversized = 0
        self._spare: bytearray | None = None

    @property
    def pending(self) -> int:
        """Bytes of an unfinished frame held."""
        if self._head is not None:
            return len(self._head)
        return self._filled if self._frame is not None else len(self._line)

    def get_buffer(self) -> memoryview:
        """Where the next bytes of the stream are to be read (release it before
        :meth:`buffer_updated`)."""
        frame = self._frame
        if isinstance(frame, bytearray):
            self._direct = True
            return memoryview(frame)[self._filled:]
        if frame is not None:
            buffer = frame.get_buffer(SCRATCH_BYTES)  # a short segment is read with what follows
            if buffer is not None:
                self._direct = True
                return buffer
        self._direct = False
        if self._skip:
            return memoryview(self._scratch)[:min(self._skip, SCRATCH_BYTES)]
        return memoryview(self._scratch)

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` bytes were read into the last buffer of :meth:`get_buffer`."""
        if self._direct:
            self._direct = False
            if isinstance(self._frame, FrameSegments):
                self._frame.buffer_updated(nbytes)
            self._filled += nbytes
            self._complete()
        else:
            self._consume(self._scratch, 0, nbytes)

    def feed(self, data: bytes | bytearray) -> None:
        """Take bytes that were read elsewhere (a copy into the frame buffer)."""
        self._consume(data, 0, len(data))

    def close(self) -> bool:
        """The stream ended: a last line without its newline is a frame. Returns False
        when it ended inside a binary frame (which is dropped, with a warning)."""
        if self._frame is not None or self._skip or self._prefix or self._head is not None:
            logger.warning("stdio stream ended inside a binary frame: %d bytes of it arrived", self.pending)
            self._frame = self._head = None
            return False
        if self._line:
            line = bytes(self._line)
            self._line.clear()
            self._on_frame(line)
        return True

    def _consume(self, data: bytes | bytearray, position: int, end: int) -> None:
        view = memoryview(data)
        try:
            while position < end:
                frame = self._frame
                if frame is not None:  # part of a frame's body read with what came before it
                    taken = min(end - position, len(frame) - self._filled)
                    if isinstance(frame, bytearray):
                        frame[self._filled:self._filled + taken] = view[position:position + taken]
                    else:
                        frame.write(view[position:position + taken])
                    self._filled += taken
                    position += taken
                    self._complete()
                elif self._skip:
                    taken = min(end - position, self._skip)
                    if self._header_left:
                        keep = min(taken, self._header_left)
                        self._header += view[position:position + keep]
                        self._header_left -= keep
                    self._skip -= taken
                    position += taken
                    if not self._skip:
                        header, self._header = bytes(self._header), bytearray()
                        self._on_frame(Oversized(self._oversized, header))
                elif self._head is not None:
                    position = self._take_head(self._head, view, position, end)
                elif self._prefix or (not self._line and data[position] == 0):
                    position = self._take_prefix(view, position, end)
                else:
                    newline = data.find(b"\n", position, end)
                    if newline < 0:
                        self._line += view[position:end]
                        return
                    if self._line:
                        self._line += view[position:newline]
                        line = bytes(self._line)
                        self._line.clear()
                    else:
                        line = bytes(view[position:newline])
                    position = newline + 1
                    self._on_frame(line)
        finally:
            view.release()

    def _take_prefix(self, view: memoryview, position: int, end: int) -> int:
        self._prefix = True
        taken = min(end - position, BINARY_PREFIX_BYTES - len(self._line))
        self._line += view[position:position + taken]
        position += taken
        if len(self._line) < BINARY_PREFIX_BYTES:
            return position
        self._prefix = False
        try:
            size = binary_frame_size(self._line)
        except ProtocolError:
            return position  # not a binary frame: ``_line`` goes on as a (malformed) line
        prefix = bytes(self._line)
        self._line.clear()
        header_size = binary_header_size(prefix)
        if self._max is not None and size > self._max:
            self._oversized = size
            self._skip = size - BINARY_PREFIX_BYTES
            self._header_left = header_size if header_size <= _OVERSIZED_HEADER else 0
            if not self._skip:
                self._on_frame(Oversized(size, b""))
            return position
        head = BINARY_PREFIX_BYTES + header_size
        if size > REUSE_BYTES and head <= min(size, _OVERSIZED_HEADER):
            large = self._head = FrameHead(prefix, size)  # read by segment once the header is here
            return self._take_head(large, view, position, end)
        frame = self._buffer(size)
        frame[:BINARY_PREFIX_BYTES] = prefix
        self._frame = frame
        self._filled = BINARY_PREFIX_BYTES
        self._complete()
        return position

    def _take_head(self, head: FrameHead, view: memoryview, position: int, end: int) -> int:
        position += head.take(view[position:end])
        if head.whole:
            self._head = None
            self._frame, self._filled = head.frame()
            self._complete()
        return position

    def _buffer(self, size: int) -> bytearray:
        """A bytearray of ``size`` bytes: the last frame's when nothing else holds it."""
        spare, self._spare = self._spare, None
        # two references: ``spare`` and getrefcount's argument (a memoryview of it holds one)
        if spare is not None and _refcount is not None and _refcount(spare) == 2:
            if size < len(spare):
                del spare[size:]
            elif size > len(spare):
                spare.extend(bytes(size - len(spare)))
            return spare
        return bytearray(size)

    def _complete(self) -> None:
        frame = self._frame
        if frame is not None and self._filled == len(frame):
            self._frame = None
            self._filled = 0
            if isinstance(frame, FrameSegments):
                self._on_frame(frame.frame())
                return
            if len(frame) <= REUSE_BYTES:
                self._spare = frame
            self._on_frame(frame)


#: Queued bytes (or frames) at which a :class:`PipeReader` stops reading until they are taken.
QUEUE_BYTES = 2 * STREAM_LIMIT
QUEUE_FRAMES = 1024


def read_available(reader: FrameReader, fd: int, what: str) -> int | None:
    """Read what the non-blocking ``fd`` has straight into ``reader``'s buffer
    (``os.readv``) and hand it over: the byte count, 0 at the end of the stream (a read
    error counts as the end, logged naming ``what``), or None when nothing was ready."""
    buffer = reader.get_buffer()
    try:
        count = os.readv(fd, [buffer])
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as exc:
        logger.warning("stdio: reading %s failed (%s); it counts as ended", what, exc)
        return 0
    finally:
        buffer.release()
    if count:
        reader.buffer_updated(count)
    return count


class PipeReader:
    """Reads frames from a pipe's file descriptor as they arrive (``loop.add_reader`` and
    ``os.readv`` straight into a :class:`FrameReader`'s buffers), for ``await next()``.

    Reading pauses while :data:`QUEUE_BYTES` or :data:`QUEUE_FRAMES` wait to be taken, so
    a slow consumer holds the writer back as a full pipe does.

    Raises:
        OSError, NotImplementedError, ValueError: at construction, where the loop cannot
            watch the descriptor (a regular file, a Windows loop); the caller falls back to
            a stream reader.
    """

    def __init__(self, fd: int, *, max_binary_bytes: int | None = None) -> None:
        if not hasattr(os, "readv"):
            raise NotImplementedError("os.readv is not available")
        self._loop = asyncio.get_running_loop()
        self._fd = fd
        self._frames: deque[Frame] = deque()
        self._queued = 0
        self._frames_reader = FrameReader(self._arrived, max_binary_bytes=max_binary_bytes)
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._paused = False
        os.set_blocking(fd, False)
        self._loop.add_reader(fd, self._ready)

    def _arrived(self, frame: Frame) -> None:
        self._frames.append(frame)
        self._queued += frame.size if isinstance(frame, Oversized) else len(frame)

    def _ready(self) -> None:
        count = read_available(self._frames_reader, self._fd, "the command stream")
        if count is None:
            return
        if not count:
            self._loop.remove_reader(self._fd)
            self._frames_reader.close()
            self._eof = True
        if not self._eof and (self._queued >= QUEUE_BYTES or len(self._frames) >= QUEUE_FRAMES):
            self._paused = True
            self._loop.remove_reader(self._fd)
        if (self._frames or self._eof) and self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self) -> Frame | None:
        """The next frame (as :func:`read_frame` returns it), or None at the end of the stream."""
        while not self._frames:
            if self._eof:
                return None
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        frame = self._frames.popleft()
        self._queued -= frame.size if isinstance(frame, Oversized) else len(frame)
        if self._paused and self._queued < QUEUE_BYTES and len(self._frames) < QUEUE_FRAMES:
            self._paused = False
            self._loop.add_reader(self._fd, self._ready)
        return frame

    def close(self) -> None:
        """Stop watching the descriptor (it stays open)."""
        if not self._eof and not self._paused:
            self._loop.remove_reader(self._fd)
        self._eof = True


class WriteEvents(Protocol):
    """What a :class:`PipeWriter` tells its owner (the names of asyncio's protocols)."""

    def pause_writing(self) -> None: ...

    def resume_writing(self) -> None: ...

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        """The pipe is closed (``exc``: the write that failed, or None); ``fd`` is 0."""


#: Queued bytes at which a :class:`PipeWriter` tells its protocol to pause writing.
WRITER_HIGH_WATER = 64 * 1024
#: Buffers handed to one ``os.writev``.
_WRITEV_PARTS = 64


class PipeWriter:
    """The executor's end of a worker's stdin pipe (where the loop can watch pipes): each part
    goes to the pipe as it is, and what the pipe does not take at once waits as a view when
    it is immutable (``bytes``, such as a large ``bytes`` argument travelling out of band),
    as a copy otherwise, so a mutable value changed after it was sent does not change the
    frame. asyncio's pipe transport copies every unwritten rest into one growing buffer: a
    100 MiB argument meant a 99 MiB copy, and its shrinking left heap the process kept.

    The executor writes each worker's stdin with one; the worker writes its events with one.
    The methods used of a write transport: ``write``, ``close``, ``is_closing``,
    ``get_write_buffer_size``; ``protocol.pause_writing`` / ``resume_writing`` and
    ``pipe_connection_lost(0, ...)`` are called as the transport would.
    """

    def __init__(self, fd: int, protocol: WriteEvents) -> None:
        os.set_blocking(fd, False)
        self._loop = asyncio.get_running_loop()
        self._fd: int | None = fd
        self._protocol = protocol
        self._queue: deque[memoryview] = deque()
        self._queued = 0
        self._closing = False
        self._watching = False
        self._paused = False

    def is_closing(self) -> bool:
        return self._closing or self._fd is None

    def get_write_buffer_size(self) -> int:
        return self._queued

    def write(self, data: Part) -> None:
        fd = self._fd
        if fd is None or self._closing:
            return
        view = memoryview(data)
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
        if not view:
            return
        if not self._queue:
            try:
                written = os.write(fd, view)
            except (BlockingIOError, InterruptedError):
                written = 0
            except OSError as exc:
                self._lost(exc)
                return
            if written == len(view):
                return
            view = view[written:]
        if not (view.readonly and type(view.obj) is bytes):
            view = memoryview(bytes(view))  # a mutable buffer: later changes must not reach the frame
        self._queue.append(view)
        self._queued += len(view)
        if not self._watching:
            self._watching = True
            self._loop.add_writer(fd, self._writable)
        if not self._paused and self._queued > WRITER_HIGH_WATER:
            self._paused = True
            self._protocol.pause_writing()

    def _writable(self) -> None:
        fd = self._fd
        if fd is None:
            return
        queue = self._queue
        try:
            written = os.writev(fd, [queue[i] for i in range(min(len(queue), _WRITEV_PARTS))])
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(exc)
            return
        self._queued -= written
        while written:
            head = queue[0]
            if written >= len(head):
                written -= len(head)
                queue.popleft()
            else:
                queue[0] = head[written:]
                written = 0
        if queue:
            return
        self._watching = False
        self._loop.remove_writer(fd)
        if self._paused:
            self._paused = False
            self._protocol.resume_writing()
        if self._closing:
            self._close_fd(None)

    def close(self) -> None:
        """Close the pipe once everything queued is written."""
        self._closing = True
        if not self._queue:
            self._close_fd(None)

    def abort(self) -> None:
        """Close the pipe now, dropping what is queued."""
        self._close_fd(None)

    def _lost(self, exc: Exception) -> None:
        self._close_fd(exc)

    def _close_fd(self, exc: Exception | None) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        self._closing = True
        self._queue.clear()
        self._queued = 0
        if self._watching:
            self._watching = False
            self._loop.remove_writer(fd)
        os.close(fd)
        self._protocol.pipe_connection_lost(0, exc)
