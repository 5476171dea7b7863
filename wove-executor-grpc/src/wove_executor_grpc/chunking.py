"""Chunked binary frames on the gRPC ``Session`` stream (capability ``binary_chunks``).

gRPC holds each message whole, in its core and again as a Python ``bytes``; a 100 MiB
binary frame sent as one message is therefore held twice on each side. Between peers that
negotiated ``binary_chunks`` (the worker announces it in the Session confirmation's
``wove-capabilities``, the client asks for it in the Session call's ``wove-capabilities``
metadata), a binary frame larger than :data:`CHUNKED_ABOVE` travels alone, split into
consecutive messages of :data:`CHUNK_BYTES` each (the last one may be shorter). The first one starts with the
frame's prefix, which says the frame's whole size; the receiver copies the chunks into one
preallocated ``bytearray`` of that size and decodes it when it is full. Frames of up to
:data:`CHUNKED_ABOVE`, JSON messages, per-call ``Send``/``Stream`` and every peer that did
not negotiate it are unchanged (docs/wire.md, "Binary frames").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

from wove.errors import ProtocolError
from wove.protocol import (
    BINARY_MAGIC,
    BINARY_PREFIX_BYTES,
    CAPABILITY_BINARY_CHUNKS,
    binary_frame_size,
)

__all__ = ["CAPABILITY_CHUNKED_FRAMES", "CHUNKED_ABOVE", "CHUNK_BYTES", "Parts", "Reassembler", "chunks", "names"]

#: The capability of a gRPC peer that reads binary frames split over several Session messages
#: (:data:`wove.protocol.CAPABILITY_BINARY_CHUNKS`, ``binary_chunks``).
CAPABILITY_CHUNKED_FRAMES = CAPABILITY_BINARY_CHUNKS
#: Binary frames larger than this are chunked (when negotiated); smaller ones go whole.
CHUNKED_ABOVE = 4 * 1024 * 1024
#: Size of each chunk message (the last one of a frame may be shorter).
CHUNK_BYTES = 256 * 1024

Buffer = bytes | bytearray | memoryview


def names(value: object) -> frozenset[str]:
    """The capability names in a comma-separated ``wove-capabilities`` value."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return frozenset(part.strip() for part in str(value or "").split(",") if part.strip())


def _view(part: Buffer) -> memoryview:
    view = memoryview(part)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


class Parts:
    """An encoded binary frame kept as its parts (the prefix and header, the pickles, views
    of the value's large buffers) instead of joined: a large command is never copied whole."""

    __slots__ = ("parts", "size")

    def __init__(self, parts: Sequence[Buffer]) -> None:
        self.parts = list(parts)
        self.size = sum(_view(part).nbytes for part in self.parts)

    def __len__(self) -> int:
        return self.size

    def join(self) -> bytes:
        """The frame as one ``bytes`` (for a peer that does not read chunks)."""
        return b"".join(self.parts)


def chunks(parts: Iterable[Buffer], size: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The bytes of ``parts`` as messages of ``size`` bytes (the last may be shorter); only
    one chunk is copied at a time."""
    pending: list[memoryview] = []
    filled = 0
    for part in parts:
        view = _view(part)
        position, end = 0, view.nbytes
        while position < end:
            take = min(end - position, size - filled)
            pending.append(view[position:position + take])
            filled += take
            position += take
            if filled == size:
                yield b"".join(pending)
                pending, filled = [], 0
    if pending:
        yield b"".join(pending)


class Reassembler:
    """Joins a chunked binary frame from its messages; every other message passes unchanged.

    Args:
        check: called with the declared size of a chunked frame before its buffer is
            allocated; raises to refuse it (a size limit). A refused frame's chunks are
            read and dropped, and the exception is raised by the ``feed`` of its last
            chunk (the sender is done writing it by then, so the call's end does not race
            its writes).
    """

    def __init__(self, check: Callable[[int], None]) -> None:
        self._check = check
        self._frame: bytearray | None = None
        self._filled = 0
        self._skipping = 0  # bytes of a refused frame still to drop
        self._refusal: BaseException | None = None

    @property
    def pending(self) -> int:
        """Bytes of an unfinished chunked frame held."""
        return self._filled if self._frame is not None else 0

    def feed(self, message: bytes) -> bytes | bytearray | None:
        """The data to decode: ``message`` itself, a chunked frame its last chunk completed,
        or None while a chunked frame is unfinished.

        Raises:
            ProtocolError: a chunk runs past the end of its frame, or a bad prefix.
        """
        if self._refusal is not None:
            self._skipping -= len(message)
            if self._skipping > 0:
                return None
            refusal, self._refusal = self._refusal, None
            raise refusal
        frame = self._frame
        if frame is not None:
            end = self._filled + len(message)
            if end > len(frame):
                self._frame = None
                raise ProtocolError(f"A chunk of {len(message)} bytes runs past the end of its binary frame "
                                    f"({len(frame) - self._filled} bytes were left)")
            frame[self._filled:end] = message
            self._filled = end
            if end < len(frame):
                return None
            self._frame, self._filled = None, 0
            return frame
        if len(message) < BINARY_PREFIX_BYTES or not message.startswith(BINARY_MAGIC):
            return message
        total = binary_frame_size(message[:BINARY_PREFIX_BYTES])
        if total <= len(message):
            return message
        try:
            self._check(total)
        except Exception as exc:
            self._refusal, self._skipping = exc, total - len(message)
            return None
        frame = self._frame = bytearray(total)
        frame[:len(message)] = message
        self._filled = len(message)
        return None
