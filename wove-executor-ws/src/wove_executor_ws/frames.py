"""How a binary message is cut into WebSocket fragments, or a large binary frame into
chunk messages, and how chunks become a frame again.

Which frames go binary is :func:`wove.framing.worth_binary`'s call (bulky data only:
small frames cost less as JSON). A binary message under :data:`FRAGMENT_BYTES` is joined
into one WebSocket frame (one ``send_binary`` costs ~2 µs; the same message in fragments
~6 µs); a larger one is sent as fragments (:func:`fragments`): the large buffers as they
are (views of the user's data), the small parts around them merged.

Binary chunks (``binary_chunks``, docs/wire.md): to a peer that speaks them, a binary
frame over :data:`CHUNK_BYTES` goes as consecutive binary messages of at most that size
(:func:`chunks`), nothing in between; the first starts with the frame's prefix, which
says the frame's size. The receiver (:class:`ChunkAssembler`) copies each chunk into one
buffer of that size, so the frame is held once, not as the library's received frames and
again as their join, and the sender pushes one chunk at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

from wove.errors import ProtocolError
from wove.protocol import BINARY_PREFIX_BYTES, binary_frame_size, is_binary

__all__ = ["CHUNK_BYTES", "FRAGMENT_BYTES", "ChunkAssembler", "chunks", "fragments"]

#: Binary messages from this size are written as fragments instead of joined.
FRAGMENT_BYTES = 256 * 1024
#: Parts below this are merged with their neighbours into one fragment.
_MERGE_BYTES = 64 * 1024


def fragments(parts: Sequence[bytes | memoryview]) -> list[bytes | memoryview]:
    """The WebSocket fragments of one binary message given as parts: the large parts as
    they are, runs of small ones joined."""
    out: list[bytes | memoryview] = []
    pending: list[bytes | memoryview] = []
    for part in parts:
        if len(part) < _MERGE_BYTES:
            pending.append(part)
            continue
        if pending:
            out.append(pending[0] if len(pending) == 1 else b"".join(pending))
            pending = []
        out.append(part)
    if pending:
        out.append(pending[0] if len(pending) == 1 else b"".join(pending))
    return out


#: A binary frame larger than this goes to a ``binary_chunks`` peer as chunk messages of
#: at most this size.
CHUNK_BYTES = 1024 * 1024


def chunks(parts: Sequence[bytes | memoryview], size: int = CHUNK_BYTES) -> list[bytes | memoryview]:
    """One binary frame, given as its parts, cut into chunk messages of at most ``size``
    bytes: views of the parts where a chunk lies within one, small joins where it spans
    several."""
    out: list[bytes | memoryview] = []
    pending: list[memoryview] = []
    room = size
    for part in parts:
        view = memoryview(part).cast("B") if not isinstance(part, bytes) else memoryview(part)
        while len(view):
            taken = view[:room]
            view = view[room:]
            pending.append(taken)
            room -= len(taken)
            if room == 0:
                out.append(pending[0] if len(pending) == 1 else b"".join(pending))
                pending, room = [], size
    if pending:
        out.append(pending[0] if len(pending) == 1 else b"".join(pending))
    return out


class ChunkAssembler:
    """Turns the messages of a ``binary_chunks`` peer back into whole messages.

    Args:
        max_bytes: the largest frame accepted (None: no limit); a chunked frame that
            declares more is refused before anything is allocated.
    """

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = max_bytes
        self._buffer: bytearray | None = None
        self._filled = 0

    @property
    def pending(self) -> int:
        """Bytes of a chunked frame received so far (0: none is being assembled)."""
        return self._filled if self._buffer is not None else 0

    def take(self, data: bytes | bytearray | memoryview) -> bytes | bytearray | memoryview | None:
        """The next message: returned as it is when it holds whole frames (or JSON); None
        while it is a chunk of a frame not yet complete; the frame (a bytearray) when it
        is the last chunk.

        Raises:
            ProtocolError: a chunked frame over ``max_bytes``, or chunks that run past the
                size the frame declared (the assembly is dropped).
        """
        buffer = self._buffer
        if buffer is not None:
            end = self._filled + len(data)
            if end > len(buffer):
                self._buffer = None
                raise ProtocolError(f"a chunked binary frame of {len(buffer)} bytes got {end} bytes")
            buffer[self._filled:end] = data
            self._filled = end
            if end < len(buffer):
                return None
            self._buffer = None
            return buffer
        if len(data) < BINARY_PREFIX_BYTES or not is_binary(data):
            return data
        size = binary_frame_size(memoryview(data)[:BINARY_PREFIX_BYTES])
        if size <= len(data):
            return data  # whole frames (the parser checks the rest)
        if self.max_bytes is not None and size > self.max_bytes:
            raise ProtocolError(f"a chunked binary frame of {size} bytes is over the limit of {self.max_bytes} bytes")
        self._buffer = bytearray(size)
        self._buffer[:len(data)] = data
        self._filled = len(data)
        return None
