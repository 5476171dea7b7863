"""How a binary message is cut into WebSocket fragments, or a large binary frame into
chunk messages, and how chunks become a frame again.

Which frames go binary is :func:`wove.framing.worth_binary`'s call (bulky data only:
small frames cost less as JSON). A binary message under :data:`FRAGMENT_BYTES` is joined
into one WebSocket frame (one ``send_binary`` costs ~2 µs; the same message in fragments
~6 µs); a larger one is sent as fragments (:func:`fragments`): the large buffers as they
are (views of the user's data), the small parts around them merged.

Binary chunks (``binary_chunks``, docs/wire.md): to a peer that speaks them, a binary
frame over :data:`CHUNK_BYTES` goes as consecutive binary messages of at most that size
(:func:`wove.framing.chunks`), nothing in between; the first starts with the frame's
prefix, which says the frame's size. The receiver (:class:`wove.framing.ChunkAssembler`) copies each chunk into one
buffer of that size, so the frame is held once, not as the library's received frames and
again as their join, and the sender pushes one chunk at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["CHUNK_BYTES", "FRAGMENT_BYTES", "fragments"]

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
#: at most this size (:func:`wove.framing.chunks`).
CHUNK_BYTES = 1024 * 1024
