"""How frames travel: a byte stream split into frames, and when a frame goes binary.

Sans-I/O helpers for the transports (docs/wire.md, "Binary frames"):

* :class:`FrameSplitter` splits a byte stream (a pipe, a streamed HTTP answer) in which
  JSON frames (one per line, ending in ``\n``) and binary frames (starting with a NUL
  byte, which never starts JSON, and saying their own length in their first
  :data:`~wove.protocol.BINARY_PREFIX_BYTES` bytes) follow each other in any mix.
* :func:`chunks` and :class:`ChunkAssembler` carry a large binary frame as consecutive
  messages (the ``binary_chunks`` extension of message transports: WebSocket, the gRPC
  ``Session``), so that neither side holds the whole frame twice.
* :class:`FrameSegments` keeps a binary frame that arrives in pieces as one ``bytes`` per
  pickle and out-of-band buffer (filled by copy or read into in place), so a large
  ``bytes`` value is the buffer it arrived in; :class:`FrameHead` holds the frame's prefix
  and header, however the reads cut them, until they give the segments' lengths.
* :func:`capability_names` reads a comma-separated capability list (a header or metadata
  value).
* :func:`worth_binary` says whether a frame is worth a binary frame once the peer offered
  them: a frame with bulky data saves base64, JSON escaping and copies; a small one (the
  no-op command, a scalar result) costs a little less as JSON, so it stays JSON. Every
  decoder reads both kinds at any time, so the choice is per frame.
"""

from __future__ import annotations

import io
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from .errors import ProtocolError
from .protocol import (
    BINARY_MAGIC,
    BINARY_PREFIX_BYTES,
    SplitFrame,
    binary_frame_size,
    binary_header_size,
    chunked_layout,
    split_frame,
)

__all__ = ["BINARY_START", "BULKY_BYTES", "ChunkAssembler", "FrameHead", "FrameSegments", "FrameSplitter", "bulky", "capability_names",
           "chunks", "worth_binary"]

#: The first byte of a binary frame (``wove.protocol.BINARY_MAGIC[:1]``).
BINARY_START = b"\x00"
#: A str or bytes value longer than this makes its frame binary (base64 and JSON escaping
#: then cost more than the binary frame's fixed overhead).
BULKY_BYTES = 4096
#: Items (elements, keys and values) looked at before a value counts as bulky.
_ITEM_BUDGET = 256


class FrameSegments:
    """A binary frame being received, kept as one ``bytes`` per segment (each pickle and
    out-of-band buffer): it becomes a :class:`~wove.protocol.SplitFrame`, whose large
    ``bytes`` values unpickle without a copy.

    Bytes go in two ways, mixed as the reader likes: :meth:`write` takes bytes read
    elsewhere (one copy, into the segment's buffer); :meth:`get_buffer` hands out the rest
    of the current segment's own buffer, for a read in place (``os.readv``, the shape of
    :class:`asyncio.BufferedProtocol`), and :meth:`buffer_updated` takes the count read
    there. A segment read in place costs only the kernel's copy: the buffer it was read
    into is the ``bytes`` that unpickles.

    ``len()`` is the frame's size; the reader counts the bytes it passed in.
    """

    __slots__ = ("_at", "_fields", "_head", "_header", "_lengths", "_piece", "_pieces", "_sized", "size")

    def __init__(self, head: bytes, header: dict[str, Any], fields: list[tuple[str, list[int]]], size: int) -> None:
        self._head, self._header, self._fields, self.size = head, header, fields, size
        self._lengths = [length for _, lengths in fields for length in lengths]
        self._pieces: list[bytes] = []
        self._piece = io.BytesIO()  # the segment being filled; its position is always ``_at``
        self._at = 0  # bytes of it that arrived
        self._sized = False  # it holds the segment's whole length (for a read in place)

    @classmethod
    def start(cls, first: memoryview, size: int) -> tuple[FrameSegments, int] | None:
        """For the first bytes of a frame of ``size`` bytes: the frame's segments and how
        many bytes of ``first`` (at most the frame) they took; None when ``first`` does not
        hold the whole header, or it is not valid (then assemble the frame whole: the
        parser says what is wrong)."""
        layout = chunked_layout(first)
        if layout is None:
            return None
        header, fields, start = layout
        segments = cls(bytes(first[:start]), header, fields, size)
        taken = min(len(first), size)
        segments.write(first[start:taken])
        return segments, taken

    def _settle(self) -> None:
        """Each segment whose bytes all arrived becomes its ``bytes``."""
        lengths, pieces = self._lengths, self._pieces
        while len(pieces) < len(lengths) and self._at == lengths[len(pieces)]:
            pieces.append(self._piece.getvalue())  # the buffer itself, not a copy
            self._piece = io.BytesIO()
            self._at = 0
            self._sized = False

    def write(self, data: memoryview) -> None:
        """Append ``data`` (the caller keeps within the frame's size)."""
        lengths, pieces = self._lengths, self._pieces
        while True:
            self._settle()
            if not data:
                return
            take = lengths[len(pieces)] - self._at
            part = data[:take]
            self._piece.write(part)
            self._at += len(part)
            data = data[take:]

    def get_buffer(self, least: int = 1) -> memoryview | None:
        """The rest of the current segment's buffer, to read the next bytes into in place
        (release the view before anything else touches this object, then call
        :meth:`buffer_updated`); None when fewer than ``least`` bytes of the segment are
        left (so a short segment is better read with others and passed to :meth:`write`)
        or no segment is left."""
        self._settle()
        if len(self._pieces) == len(self._lengths):
            return None
        length = self._lengths[len(self._pieces)]
        if length - self._at < least:
            return None
        piece = self._piece
        if not self._sized:  # grow it to the segment's length once (zeros, overwritten)
            piece.seek(length - 1)
            piece.write(b"\0")
            piece.seek(self._at)
            self._sized = True
        return piece.getbuffer()[self._at:]

    def buffer_updated(self, count: int) -> None:
        """``count`` bytes were read into the last buffer of :meth:`get_buffer`."""
        self._at += count
        self._piece.seek(self._at)

    def __len__(self) -> int:
        return self.size

    def frame(self) -> SplitFrame:
        """The whole frame (every byte arrived)."""
        self._settle()  # segments of no bytes at the end
        return split_frame(self._head, self._header, self._fields, self._pieces, self.size)


class FrameHead:
    """The head of a binary frame to be kept by segment (its prefix and JSON header, which
    give the segments' lengths), held as the reads bring it until it is whole.

    ``len()`` is how many of its bytes are held, :attr:`size` the whole frame's size.
    """

    __slots__ = ("_data", "_left", "size")

    def __init__(self, prefix: bytes | bytearray | memoryview, size: int) -> None:
        """``prefix``: the frame's first :data:`~wove.protocol.BINARY_PREFIX_BYTES` bytes
        (already checked: :func:`~wove.protocol.binary_frame_size` gave ``size``)."""
        self._data = bytearray(prefix)
        self._left = binary_header_size(prefix)
        self.size = size

    def __len__(self) -> int:
        return len(self._data)

    def take(self, data: memoryview) -> int:
        """Take what of ``data`` (the next bytes of the stream) belongs to the head; how
        many bytes that was."""
        taken = data[:self._left]
        self._data += taken
        self._left -= len(taken)
        return len(taken)

    @property
    def whole(self) -> bool:
        return not self._left

    def frame(self) -> tuple[FrameSegments | bytearray, int]:
        """Once :attr:`whole`: the frame to fill, kept by segment (or, when its header is
        not valid, one buffer of its size, for its parser to report), and how many of its
        bytes are in."""
        head = bytes(self._data)
        started = FrameSegments.start(memoryview(head), self.size)
        if started is not None:
            return started
        frame = bytearray(self.size)
        frame[:len(head)] = head
        return frame, len(head)


class FrameSplitter:
    """Splits bytes as they arrive from a pipe into frames, JSON lines and binary frames
    mixed (for a protocol's ``data_received``; no reader task).

    Args:
        on_frame: called with each complete frame: a JSON line (bytes without ``\\n``)
            or a binary frame (a bytearray of exactly its size, or see ``by_segment``).
        on_error: called with a description when bytes start like a binary frame but
            are not one; they are dropped up to the next newline.
        by_segment: a binary frame that spans several reads goes to ``on_frame`` as a
            :class:`~wove.protocol.SplitFrame` (one ``bytes`` per pickle and out-of-band
            buffer, so a large ``bytes`` value unpickles without a copy) instead of a
            bytearray; its header is held until it is whole, however the reads cut it.
    """

    def __init__(self, on_frame: Callable[[bytes | bytearray | SplitFrame], None],
                 on_error: Callable[[str], None], *, by_segment: bool = False) -> None:
        self._on_frame = on_frame
        self._by_segment = by_segment
        self._on_error = on_error
        self._line = bytearray()  # the start of a JSON line (or of a binary prefix)
        self._binary: bytearray | FrameSegments | None = None  # the binary frame being filled
        self._filled = 0
        self._head: FrameHead | None = None  # by segment: the head of the next frame, until whole
        self._skip_line = False  # dropping bytes up to the next newline

    @property
    def pending(self) -> int:
        """Bytes of an unfinished frame held."""
        if self._head is not None:
            return len(self._head)
        return self._filled if self._binary is not None else len(self._line)

    def feed(self, data: bytes) -> None:
        """Take the next bytes of the stream; complete frames go to ``on_frame``."""
        view = memoryview(data)
        position, end = 0, len(data)
        while position < end:
            if self._binary is not None:
                position = self._fill(view, position)
                continue
            if self._head is not None:
                position = self._take_head(self._head, view, position)
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
        if self._by_segment:
            head = self._head = FrameHead(view[position:position + BINARY_PREFIX_BYTES], size)
            return self._take_head(head, view, position + BINARY_PREFIX_BYTES)
        self._binary = bytearray(size)
        self._filled = 0
        return self._fill(view, position)

    def _take_head(self, head: FrameHead, view: memoryview, position: int) -> int:
        position += head.take(view[position:])
        if not head.whole:
            return position
        self._head = None
        self._binary, self._filled = head.frame()
        return self._complete(position)

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
        if self._by_segment:
            head = self._head = FrameHead(prefix, size)
            return self._take_head(head, view, position)
        self._binary = bytearray(size)
        self._binary[:BINARY_PREFIX_BYTES] = prefix
        self._filled = BINARY_PREFIX_BYTES
        return self._complete(position)

    def _fill(self, view: memoryview, position: int) -> int:
        frame = self._binary
        assert frame is not None
        taken = view[position:position + len(frame) - self._filled]
        if isinstance(frame, FrameSegments):
            frame.write(taken)
        else:
            frame[self._filled:self._filled + len(taken)] = taken
        self._filled += len(taken)
        return self._complete(position + len(taken))

    def _complete(self, position: int) -> int:
        frame = self._binary
        if frame is not None and self._filled == len(frame):
            self._binary = None
            self._filled = 0
            self._on_frame(frame.frame() if isinstance(frame, FrameSegments) else frame)
        return position

    def close(self) -> None:
        """The stream ended: a last line without its newline is a frame; an unfinished
        binary frame is reported to ``on_error`` and dropped."""
        frame = self._binary if self._binary is not None else self._head
        if frame is not None:
            size = frame.size if isinstance(frame, FrameHead) else len(frame)
            self._on_error(f"the stream ended inside a binary frame: {self.pending} of its {size} bytes arrived")
            self._binary = self._head = None
        elif self._line[:1] == BINARY_START:
            self._on_error(f"the stream ended inside a binary frame's prefix ({len(self._line)} bytes arrived)")
        elif self._line and not self._skip_line:
            self._on_frame(bytes(self._line))
        self._line.clear()
        self._filled = 0


_SCALARS = frozenset({int, float, bool, type(None), complex})
_TEXT = frozenset({str, bytes})
_SEQUENCES = frozenset({list, tuple, set, frozenset})


def bulky(value: Any) -> bool:
    """True when ``value`` is worth a binary frame (module docstring); never raises."""
    kind = type(value)
    if kind in _SCALARS:
        return False
    if kind in _TEXT:
        return len(value) > BULKY_BYTES
    if kind is dict and len(value) <= 32:  # keyword arguments of scalars: one pass, no stack
        for key, item in value.items():
            of = type(item)
            if ((of in _SCALARS or (of in _TEXT and len(item) <= BULKY_BYTES))
                    and type(key) is str and len(key) <= BULKY_BYTES):
                continue
            break
        else:
            return False
    stack = [value]
    budget = _ITEM_BUDGET
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind in _SCALARS:
            continue
        if kind in _TEXT:
            if len(item) > BULKY_BYTES:
                return True
            continue
        if kind is dict:
            budget -= 2 * len(item)
            if budget < 0:
                return True
            stack.extend(item.keys())
            stack.extend(item.values())
        elif kind in _SEQUENCES:
            budget -= len(item)
            if budget < 0:
                return True
            stack.extend(item)
        else:  # a buffer, an array, or an object that may hold anything
            return True
    return False


def _bulky_callable(func: Any) -> bool:
    if isinstance(func, types.FunctionType):
        if func.__closure__:
            try:
                return any(bulky(cell.cell_contents) for cell in func.__closure__)
            except ValueError:  # an empty cell
                return True
        return bool(func.__defaults__) and bulky(func.__defaults__)
    # builtins and classes are pickled by reference; anything else (a partial, a callable
    # object) may carry data
    return not isinstance(func, (types.BuiltinFunctionType, type))


def _bulky_command(frame: Mapping[str, Any]) -> bool:
    """True when a ``run_task`` is worth a binary frame: bulky arguments or a callable
    that carries data (a closure over a large value, a ``functools.partial``...)."""
    args = frame.get("args")
    if args and bulky(args):
        return True
    func = frame.get("callable")
    if type(func) is types.FunctionType and func.__closure__ is None and func.__defaults__ is None:
        return False  # the common case, decided without a call
    return _bulky_callable(func)


def _bulky_event(event: Mapping[str, Any]) -> bool:
    """True when an event is worth a binary frame: a bulky result, streamed item or
    exception object."""
    get = event.get
    return bulky(get("result")) or bulky(get("item")) or bulky(get("exception"))


def worth_binary(frame: Mapping[str, Any]) -> bool:
    """True when ``frame`` is worth a binary frame (module docstring): a ``run_task``
    whose arguments are bulky or whose callable carries data (a closure over a large
    value, a ``functools.partial``...), or an event with a bulky result, streamed item or
    exception object. Costs well under a microsecond for a small frame; never raises."""
    if frame.get("type") == "run_task":
        return _bulky_command(frame)
    return _bulky_event(frame)


def capability_names(value: object) -> frozenset[str]:
    """The names in a comma-separated capability list (``X-Wove-Capabilities``, gRPC
    ``wove-capabilities`` metadata; ``bytes`` read as Latin-1); empty for None."""
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("latin-1")
    return frozenset(part.strip() for part in str(value or "").split(",") if part.strip())


def _byte_view(part: bytes | bytearray | memoryview) -> memoryview:
    view = memoryview(part)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def chunks(parts: Iterable[bytes | bytearray | memoryview], size: int) -> Iterator[bytes]:
    """The bytes of one binary frame, given as its parts (prefix and header, pickles,
    views of large buffers), as chunk messages of ``size`` bytes (the last may be
    shorter), for a peer that reads ``binary_chunks``. Produced one at a time: only the
    chunk being sent is ever copied."""
    if size < BINARY_PREFIX_BYTES:
        raise ValueError(f"a chunk holds at least the {BINARY_PREFIX_BYTES}-byte prefix; got size={size}")
    pending: list[memoryview] = []
    filled = 0
    for part in parts:
        view = _byte_view(part)
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


class ChunkAssembler:
    """Turns the messages of a ``binary_chunks`` peer back into whole messages: a message
    that starts a binary frame larger than itself begins a chunked frame, and the messages
    after it complete it (nothing may come between them); every other message passes
    unchanged.

    A chunked frame fills one buffer of the size its prefix declares; with ``by_segment``
    it is kept as one ``bytes`` per segment instead, each pickle and each out-of-band
    buffer (:class:`wove.protocol.SplitFrame`), so a large ``bytes`` value is its own
    buffer and unpickles without a copy (a frame whose first chunk does not hold its whole
    header, or whose header is not valid, still fills one buffer, and the parser reports
    what is wrong with it).

    Args:
        check: called with the declared size of a chunked frame before anything is
            allocated for it; it raises to refuse the frame (a size limit).
        drop_refused: what a refusal does. False (the default): ``feed`` raises at once.
            True: the refused frame's remaining chunks are read and dropped and ``feed``
            raises with its last chunk (for a transport whose call should end only once
            the sender is done writing, such as a gRPC stream).
        by_segment: keep a chunked frame by segment (above).
    """

    def __init__(self, check: Callable[[int], None] | None = None, *, drop_refused: bool = False,
                 by_segment: bool = False) -> None:
        self._check = check
        self._drop_refused = drop_refused
        self._by_segment = by_segment
        self._frame: bytearray | FrameSegments | None = None  # the chunked frame being assembled
        self._filled = 0
        self._skipping = 0  # bytes of a refused frame still to drop
        self._refusal: BaseException | None = None

    @property
    def pending(self) -> int:
        """Bytes of an unfinished chunked frame held (or being dropped)."""
        if self._refusal is not None:
            return 1
        return self._filled if self._frame is not None else 0

    def feed(self, message: bytes | bytearray | memoryview) -> bytes | bytearray | memoryview | SplitFrame | None:
        """The data to decode: ``message`` itself, the chunked frame its last chunk
        completed (a bytearray, or with ``by_segment`` a :class:`~wove.protocol.SplitFrame`),
        or None while a chunked frame is unfinished.

        Raises:
            ProtocolError: a chunk runs past the end of its frame, or a bad prefix.
            Exception: what ``check`` raised for a refused frame.
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
                left = len(frame) - self._filled
                self._frame, self._filled = None, 0
                raise ProtocolError(f"A chunk of {len(message)} bytes runs past the end of its binary frame "
                                    f"({left} bytes were left)")
            if isinstance(frame, FrameSegments):
                frame.write(memoryview(message))
            else:
                frame[self._filled:end] = message
            self._filled = end
            if end < len(frame):
                return None
            self._frame, self._filled = None, 0
            return frame.frame() if isinstance(frame, FrameSegments) else frame
        if len(message) < BINARY_PREFIX_BYTES or message[:len(BINARY_MAGIC)] != BINARY_MAGIC:
            return message
        total = binary_frame_size(memoryview(message)[:BINARY_PREFIX_BYTES])
        if total <= len(message):
            return message  # whole frames (the parser checks the rest)
        if self._check is not None:
            try:
                self._check(total)
            except Exception as exc:
                if not self._drop_refused:
                    raise
                self._refusal, self._skipping = exc, total - len(message)
                return None
        started = FrameSegments.start(memoryview(message), total) if self._by_segment else None
        if started is not None:
            self._frame, self._filled = started
            return None
        frame = self._frame = bytearray(total)
        frame[:len(message)] = message
        self._filled = len(message)
        return None
