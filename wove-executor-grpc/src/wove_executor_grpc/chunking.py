"""Chunked binary frames on the gRPC ``Session`` stream (capability ``binary_chunks``).

gRPC holds each message whole, in its core and again as a Python ``bytes``; a 100 MiB
binary frame sent as one message is therefore held twice on each side. Between peers that
negotiated ``binary_chunks`` (the worker announces it in the Session confirmation's
``wove-capabilities``, the client asks for it in the Session call's ``wove-capabilities``
metadata), a binary frame larger than :data:`CHUNKED_ABOVE` travels alone, split into
consecutive messages of :data:`CHUNK_BYTES` each (the last one may be shorter). The first one starts with the
frame's prefix, which says the frame's whole size; the receiver copies the chunks into one
preallocated ``bytearray`` of that size and decodes it when it is full
(:func:`wove.framing.chunks` and :class:`wove.framing.ChunkAssembler`, which the
WebSocket transport uses too). Frames of up to
:data:`CHUNKED_ABOVE`, JSON messages, per-call ``Send``/``Stream`` and every peer that did
not negotiate it are unchanged (docs/wire.md, "Binary frames").
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["CHUNKED_ABOVE", "CHUNK_BYTES", "Parts"]
#: Binary frames larger than this are chunked (when negotiated); smaller ones go whole.
CHUNKED_ABOVE = 4 * 1024 * 1024
#: Size of each chunk message (the last one of a frame may be shorter).
CHUNK_BYTES = 256 * 1024

Buffer = bytes | bytearray | memoryview


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
