"""Frame shapes and the one wire codec every transport shares (sans-I/O).

In process, frames are dicts. On the wire a frame is one JSON object in which Python
values travel as base64 cloudpickle fields (``callable`` → ``callable_pickle`` and so
on), the format Wove 2.x peers speak. Nothing here touches a socket or an event loop;
executors and worker services only move the bytes this module produces and reads.
"""

from __future__ import annotations

import binascii
import json
import logging
import os
import struct
import traceback
from collections.abc import Callable
from typing import Any, Literal, TypedDict, TypeVar

from . import dispatch
from ._capture import HOST
from ._codec_cache import CallableCache, DecodedCallables, fast_b64, fast_pickle
from .errors import DispatchError, MissingDispatchFeatureError, ProtocolError

logger = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = [
    "BINARY_MAGIC",
    "BINARY_PREFIX_BYTES",
    "CANCEL_MODES",
    "CAPABILITY_BINARY_CHUNKS",
    "CAPABILITY_BINARY_FRAMES",
    "CAPABILITY_COMMAND_LISTS",
    "CAPABILITY_TASK_YIELD",
    "COMMAND_TYPES",
    "EVENT_TYPES",
    "ORPHAN_POLICIES",
    "TERMINAL_EVENTS",
    "CancelTaskFrame",
    "ErrorPayload",
    "EventFrame",
    "RunTaskFrame",
    "ShutdownFrame",
    "SplitFrame",
    "binary_frame_size",
    "binary_header_size",
    "chunked_layout",
    "decode_command",
    "decode_events",
    "encode_binary_parts",
    "encode_event",
    "encode_event_parts",
    "encode_events",
    "encode_frame",
    "error_event",
    "is_binary",
    "normalize_exception",
    "pack_frame",
    "parse_frames",
    "parse_json",
    "split_frame",
    "transport_error_event",
    "unpack_frame",
]

#: The capability a worker announces when it streams generator results (``task_yield``
#: events, ``stream_credit`` commands); only such a peer ever sees either (docs/wire.md).
CAPABILITY_TASK_YIELD = "task_yield"
#: The capability of a peer that reads and writes binary frames (:func:`encode_binary_parts`):
#: pickles as raw bytes with protocol-5 out-of-band buffers instead of base64 in JSON.
CAPABILITY_BINARY_FRAMES = "binary_frames"
#: The capability of a WebSocket worker that takes a JSON list of commands in one text
#: message (Wove 2.x takes one command per message): a client then sends the commands
#: queued together as one message, which halves the per-message cost on both sides.
CAPABILITY_COMMAND_LISTS = "command_lists"
#: The capability of a peer that reads a large binary frame sent as consecutive messages
#: (chunks), assembling it into one buffer of the size its prefix declares, so neither
#: side holds the whole message twice (docs/wire.md, "Binary chunks").
CAPABILITY_BINARY_CHUNKS = "binary_chunks"
#: The first bytes of a binary frame (a NUL never starts a JSON text, so a reader tells the
#: two apart from the first byte), then the format version.
BINARY_MAGIC = b"\x00WV\x01"
#: magic, header length (u32), body length (u64), big-endian
_PREFIX = struct.Struct("!4sIQ")
#: Bytes of a binary frame's fixed prefix; :func:`binary_frame_size` reads the frame's size from them.
BINARY_PREFIX_BYTES = _PREFIX.size
_MAX_HEADER = 64 * 1024 * 1024
COMMAND_TYPES = frozenset({"run_task", "cancel_task", "shutdown", "stream_credit"})
TERMINAL_EVENTS = frozenset({"task_result", "task_error", "task_cancelled"})
EVENT_TYPES = frozenset({"task_started", "heartbeat", "log", "task_yield", *TERMINAL_EVENTS})
ORPHAN_POLICIES = ("fail", "cancel", "requeue", "detach")
CANCEL_MODES = ("best_effort", "require_ack")
ERROR_SOURCES = ("task", "executor", "transport", "config")

#: process-wide caches of pickled callables (see wove._codec_cache for when they apply)
_CALLABLES = CallableCache()
_DECODED = DecodedCallables()

# value field -> wire field
_PICKLED = {
    "callable": "callable_pickle",
    "args": "args_pickle",
    "result": "result_pickle",
    "item": "item_pickle",
    "exception": "exception_pickle",
    "error": "error_pickle",
}
_WIRE_FIELDS = frozenset(_PICKLED.values())
_FIELD_OF = {wire_field: field for field, wire_field in _PICKLED.items()}
#: fields decode in this order (the callable first: its errors name the run best)
_FIELD_ORDER = {wire_field: index for index, wire_field in enumerate(_PICKLED.values())}
#: compact JSON, built once (``json.dumps`` with arguments builds an encoder per call)
_json_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _not_json(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


#: ``JSONEncoder.encode`` builds its C encoder on every call (a third of a small
#: header's cost): this one is built once. It keeps no circular-reference markers; a
#: circular value (which no frame holds) goes to the regular encoder, which says so.
_c_encoder = (json.encoder.c_make_encoder(None, _not_json, json.encoder.encode_basestring, None, ":", ",",  # type: ignore[attr-defined]
                                          False, False, True)
              if getattr(json.encoder, "c_make_encoder", None) is not None else None)


def _header_json(wire: dict[str, Any]) -> str:
    """``wire`` as compact JSON, as ``json.dumps(wire, separators=(",", ":"), ensure_ascii=False)``."""
    if _c_encoder is not None:
        try:
            return "".join(_c_encoder(wire, 0))
        except RecursionError:
            pass
    return _json_encode(wire)


class ErrorPayload(TypedDict, total=False):
    kind: str
    message: str
    traceback: str
    retryable: bool
    source: Literal["task", "executor", "transport", "config"]
    #: where the exception was raised (a Wove 2.x peer sends neither, and ignores them)
    host: str
    pid: int


class Delivery(TypedDict, total=False):
    delivery_timeout: float
    delivery_idempotency_key: str
    delivery_cancel_mode: str
    delivery_heartbeat_seconds: float
    delivery_orphan_policy: str
    #: send the run's print() and logging output as ``log`` events (ignored by Wove 2.x)
    delivery_capture_output: bool
    #: a streamed run (``runtime.stream``): items the worker may produce before credit
    delivery_stream_window: int


class _TraceContext(TypedDict, total=False):
    #: W3C Trace Context of the caller's span for the run (``wove.observe``); a Wove 2.x
    #: peer ignores both (docs/wire.md, "Trace context")
    traceparent: str
    tracestate: str


class RunTaskFrame(_TraceContext):
    type: Literal["run_task"]
    run_id: str
    task_id: str
    callable: Any
    args: dict[str, Any]
    delivery: Delivery


class CancelTaskFrame(TypedDict, total=False):
    type: Literal["cancel_task"]
    run_id: str
    task_id: str
    delivery_cancel_mode: str
    delivery_orphan_policy: str


class ShutdownFrame(TypedDict, total=False):
    type: Literal["shutdown"]
    delivery_orphan_policy: str


class EventFrame(TypedDict, total=False):
    type: str
    run_id: str
    task_id: str
    result: Any
    error: ErrorPayload
    exception: BaseException
    message: str
    # a ``log`` event carrying a run's output: ``stream`` text or a ``record``
    stream: Literal["stdout", "stderr"]
    record: dict[str, Any]
    host: str
    pid: int
    # a ``task_yield`` event: one item of a streamed run and its 0-based sequence number
    item: Any
    seq: int


#: files whose frames lead into a task's code (left out of a task's traceback)
_ENGINE_FILES = frozenset(os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
                          for name in ("worker.py", "_threads.py"))


def normalize_exception(
    exc: BaseException, *, source: str = "task", retryable: bool = False
) -> dict[str, Any]:
    """Return the normalized, JSON-safe error payload for ``exc``: ``kind``, ``message``,
    ``traceback`` (the formatted traceback, with its chain), ``retryable``, ``source``,
    and ``host`` and ``pid`` of this process (where the exception was raised)."""
    try:
        message = str(exc)
    except Exception as failure:  # a __str__ that raises must not lose the error
        message = f"<{type(exc).__name__}.__str__ raised {type(failure).__name__}: {failure}>"
    tb = exc.__traceback__
    if source == "task":  # the worker engine's own frames say nothing about the task
        while tb is not None and tb.tb_next is not None and tb.tb_frame.f_code.co_filename in _ENGINE_FILES:
            tb = tb.tb_next
    return {
        "kind": type(exc).__name__,
        "message": message,
        "traceback": "".join(traceback.format_exception(type(exc), exc, tb)),
        "retryable": retryable,
        "source": source,
        "host": HOST,
        "pid": os.getpid(),
    }


def error_event(
    run_id: str,
    task_id: str,
    *,
    kind: str,
    message: str,
    source: str,
    retryable: bool = False,
    exc: BaseException | None = None,
) -> dict[str, Any]:
    """Build a ``task_error`` event with a normalized payload."""
    payload: dict[str, Any] = {
        "kind": kind,
        "message": message,
        "traceback": ""
        if exc is None
        else "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        "retryable": retryable,
        "source": source,
    }
    return {"type": "task_error", "run_id": run_id, "task_id": task_id, "error": payload}


def transport_error_event(
    command: dict[str, Any], message: str, exc: BaseException | None = None, *, retryable: bool = True
) -> dict[str, Any]:
    """A ``task_error`` with ``source="transport"`` for the run of ``command``."""
    kind = type(exc).__name__ if exc is not None else "TransportError"
    return error_event(
        str(command.get("run_id")),
        str(command.get("task_id")),
        kind=kind,
        message=message,
        source="transport",
        retryable=retryable,
        exc=exc,
    )


def pack_frame(frame: dict[str, Any]) -> dict[str, Any]:
    """Return the JSON-safe wire form of ``frame``.

    ``callable`` and ``args`` that cannot be pickled raise :class:`DispatchError` naming
    the task and the path to the offending object. An exception that cannot be pickled
    is left out (its normalized ``error`` still travels); a plain-JSON ``error`` payload
    stays plain JSON, which every peer reads.

    Raises:
        DispatchError: the callable, an argument or a result cannot be pickled.
        MissingDispatchFeatureError: a value needs pickling and cloudpickle is missing.
    """
    wire, pickles = _pack(frame)
    wire.update(pickles)
    return wire


#: the fields that carry Python values (pickled on the wire), in their wire order
_VALUE_FIELDS = ("callable", "args", "result", "item")


def _pickled_text(field: str, value: Any, frame: dict[str, Any]) -> str:
    """The base64 pickle of a frame's ``callable``, ``args``, ``result`` or ``item``.

    Raises:
        DispatchError: ``value`` cannot be pickled (the message names the task).
    """
    text = _CALLABLES.encode(value) if field == "callable" else fast_b64(value)
    if text is None:
        try:
            text = dispatch.dumps_b64(value, what=field)
        except DispatchError as exc:
            task = frame.get("task_id") or frame.get("run_id") or "?"
            raise DispatchError(f"Task '{task}': {exc}") from exc.__cause__
    return text


def _pack(frame: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """``pack_frame`` in two parts: the plain fields, and the base64 ``*_pickle`` fields."""
    wire = dict(frame)
    pickles: dict[str, str] = {}
    for field in _VALUE_FIELDS:
        if field in wire:
            pickles[_PICKLED[field]] = _pickled_text(field, wire.pop(field), frame)
    if "exception" in wire:
        exception = wire.pop("exception")
        try:
            pickles["exception_pickle"] = dispatch.dumps_b64(exception, what="exception")
        except DispatchError:
            pass  # the normalized error payload still says kind, message and traceback
    if "error" in wire and not _is_json_error(wire["error"]):
        pickles["error_pickle"] = dispatch.dumps_b64(wire.pop("error"), what="error")
    return wire, pickles


def _is_json_error(error: Any) -> bool:
    return isinstance(error, dict) and all(
        isinstance(key, str) and (value is None or isinstance(value, (str, bool, int, float)))
        for key, value in error.items()
    )


#: a run_task as the runtime builds it, in its order: :func:`_run_task_json` encodes it
_RUN_TASK_FIELDS = ("type", "run_id", "task_id", "callable", "args", "delivery")
#: a JSON string literal, as the header encoder writes one
_json_string: Callable[[str], str] = json.encoder.encode_basestring  # type: ignore[attr-defined]
#: the JSON of the delivery settings seen lately (an environment's runs mostly share one)
_DELIVERY_JSON: dict[tuple[Any, ...], str] = {}
_DELIVERY_JSON_SIZE = 64
_DELIVERY_VALUES = frozenset({str, int, float, bool, type(None)})


def _run_task_json(frame: dict[str, Any]) -> str | None:
    """The JSON of a run_task in the runtime's own shape, built without the general
    encoder (byte-identical to it), or None for any other frame."""
    if len(frame) != 6 or tuple(frame) != _RUN_TASK_FIELDS or frame["type"] != "run_task":
        return None
    run_id, task_id, delivery = frame["run_id"], frame["task_id"], frame["delivery"]
    if type(run_id) is not str or type(task_id) is not str or type(delivery) is not dict:
        return None
    try:  # the types are part of the key: True == 1 == 1.0, but their JSON differs
        key = (*delivery.items(), *map(type, delivery.values()))
        settings = _DELIVERY_JSON.get(key)
    except TypeError:  # an unhashable value: the general encoder takes it
        return None
    if settings is None:
        if not _DELIVERY_VALUES.issuperset(map(type, delivery.values())):
            return None
        if len(_DELIVERY_JSON) >= _DELIVERY_JSON_SIZE:
            _DELIVERY_JSON.clear()
        settings = _DELIVERY_JSON[key] = _header_json(delivery)
    func = _pickled_text("callable", frame["callable"], frame)
    args = _pickled_text("args", frame["args"], frame)
    return (f'{{"type":"run_task","run_id":{_json_string(run_id)},"task_id":{_json_string(task_id)},'
            f'"delivery":{settings},"callable_pickle":"{func}","args_pickle":"{args}"}}')


_RESULT_FIELDS = ("type", "result", "run_id", "task_id")


def _result_json(frame: dict[str, Any]) -> str | None:
    """The JSON of a task_result in the worker engine's own shape, built without the
    general encoder (byte-identical to it), or None for any other frame."""
    if len(frame) != 4 or tuple(frame) != _RESULT_FIELDS or frame["type"] != "task_result":
        return None
    run_id, task_id = frame["run_id"], frame["task_id"]
    if type(run_id) is not str or type(task_id) is not str:
        return None
    result = _pickled_text("result", frame["result"], frame)
    return (f'{{"type":"task_result","run_id":{_json_string(run_id)},"task_id":{_json_string(task_id)},'
            f'"result_pickle":"{result}"}}')


def encode_frame(frame: dict[str, Any], *, binary: bool = False) -> bytes:
    """Encode one command or event frame as compact UTF-8 JSON (no trailing newline), or,
    with ``binary``, as one binary frame (:func:`encode_binary_parts`, joined)."""
    if binary:
        return b"".join(encode_binary_parts(frame))
    usual = _run_task_json(frame) if frame.get("type") == "run_task" else _result_json(frame)
    if usual is not None:
        return usual.encode("utf-8")
    wire, pickles = _pack(frame)
    text = _header_json(wire)
    if pickles and text != "{}":
        # base64 needs no JSON escaping: append the (long) pickled fields verbatim instead
        # of having the encoder scan them character by character
        text = text[:-1] + "".join([f',"{key}":"{value}"' for key, value in pickles.items()]) + "}"
    elif pickles:
        text = json.dumps(pickles, separators=(",", ":"))
    return text.encode("utf-8")


def _pickled_slowly(field: str, value: Any, frame: dict[str, Any]) -> tuple[bytes, list[memoryview]]:
    try:
        return dispatch.dumps_out_of_band(value, what=field)
    except DispatchError as exc:
        task = frame.get("task_id") or frame.get("run_id") or "?"
        raise DispatchError(f"Task '{task}': {exc}") from exc.__cause__


def encode_binary_parts(frame: dict[str, Any]) -> list[bytes | memoryview]:
    """Encode one frame as a binary frame, in parts to write in order (docs/wire.md,
    "Binary frames"): the prefix and JSON header, then each pickle and its out-of-band
    buffers. Large buffers are views of the values' own memory, not copies; a transport
    that can write several buffers at once (``writelines``, a fragmented message) sends
    them as they are.

    Raises:
        DispatchError: as :func:`pack_frame`.
    """
    wire = dict(frame)
    segments: dict[str, list[int]] = {}
    head: list[bytes | memoryview] = [b""]
    size = 0
    for field in _VALUE_FIELDS:
        if field not in wire:
            continue
        value = wire.pop(field)
        packed: tuple[bytes, list[memoryview]] | None
        if field == "callable":
            raw = _CALLABLES.encode_raw(value)
            packed = None if raw is None else (raw, [])
        else:
            packed = fast_pickle(value)
        data, buffers = packed if packed is not None else _pickled_slowly(field, value, frame)
        size += len(data)
        head.append(data)
        if buffers:
            lengths = [len(data)]
            for buffer in buffers:
                lengths.append(len(buffer))
                size += len(buffer)
            head.extend(buffers)
            segments[_PICKLED[field]] = lengths
        else:
            segments[_PICKLED[field]] = [len(data)]
    for field, wire_field in (("exception", "exception_pickle"), ("error", "error_pickle")):
        if field not in wire or (field == "error" and _is_json_error(wire["error"])):
            continue
        value = wire.pop(field)
        try:
            data, buffers = dispatch.dumps_out_of_band(value, what=field)
        except DispatchError:
            if field == "error":
                raise
            continue  # the normalized error payload still says kind, message and traceback
        head.append(data)
        head.extend(buffers)
        segments[wire_field] = [len(data), *map(len, buffers)]
        size += sum(segments[wire_field])
    if segments:
        wire["pickles"] = segments
    header = _header_json(wire).encode("utf-8")
    head[0] = _PREFIX.pack(BINARY_MAGIC, len(header), size) + header
    return head


def is_binary(data: Any) -> bool:
    """True when ``data`` (bytes, or a :class:`SplitFrame`) starts with a binary frame rather than JSON."""
    kind = type(data)
    if kind is bytes or kind is bytearray:
        return data.startswith(BINARY_MAGIC)  # type: ignore[no-any-return]
    if kind is SplitFrame:  # a binary frame that arrived in chunks
        return True
    return isinstance(data, (bytes, bytearray, memoryview)) and data[:4] == BINARY_MAGIC


def binary_frame_size(prefix: bytes | bytearray | memoryview) -> int:
    """The whole size in bytes of the binary frame that starts with ``prefix`` (its first
    :data:`BINARY_PREFIX_BYTES` bytes), for a reader of a byte stream.

    Raises:
        ProtocolError: ``prefix`` is short, not a binary frame, or declares a header
            larger than 64 MiB.
    """
    return _prefix_sizes(prefix)[0]


def binary_header_size(prefix: bytes | bytearray | memoryview) -> int:
    """The size in bytes of the JSON header of the binary frame that starts with
    ``prefix`` (its first :data:`BINARY_PREFIX_BYTES` bytes).

    Raises:
        ProtocolError: as :func:`binary_frame_size` does.
    """
    return _prefix_sizes(prefix)[1]


def _prefix_sizes(prefix: bytes | bytearray | memoryview) -> tuple[int, int]:
    """(whole size, header size) of the binary frame whose prefix is ``prefix``."""
    if len(prefix) < BINARY_PREFIX_BYTES:
        raise ProtocolError(f"A binary frame starts with {BINARY_PREFIX_BYTES} bytes; got {len(prefix)}")
    return _frame_size(prefix, 0)


def _frame_size(data: bytes | bytearray | memoryview, offset: int) -> tuple[int, int]:
    """(whole size, header size) of the binary frame at ``offset`` (16 bytes are there)."""
    magic, header, body = _PREFIX.unpack_from(data, offset)
    if magic != BINARY_MAGIC:
        raise ProtocolError(f"Not a binary frame: it starts {bytes(magic)!r}, expected {BINARY_MAGIC!r}")
    if header > _MAX_HEADER:
        raise ProtocolError(f"Binary frame header of {header} bytes is over the limit of {_MAX_HEADER}")
    return BINARY_PREFIX_BYTES + header + body, header


_NO_BUFFERS: list[memoryview] = []  # shared, never changed


class _Segment:
    """A pickled field of a binary frame: views of its pickle and out-of-band buffers
    (or, of a :class:`SplitFrame`, the buffers as ``bytes`` of their own)."""

    __slots__ = ("buffers", "data")

    def __init__(self, data: memoryview, buffers: list[memoryview] | list[bytes]) -> None:
        self.data = data
        self.buffers = buffers


def _bad_lengths(wire_field: Any, lengths: Any) -> ProtocolError:
    if wire_field not in _WIRE_FIELDS:
        return ProtocolError(f"Binary frame names an unknown pickled field {wire_field!r:.60}")
    return ProtocolError(f"Binary frame lengths of {wire_field!r} must be a list of non-negative integers, "
                         f"got {lengths!r:.80}")


def _pickle_table(header: dict[str, Any]) -> list[tuple[str, list[int]]]:
    """Take the header's ``pickles`` table: each pickled field's segment lengths (the
    pickle's, then its out-of-band buffers'), in frame order.

    Raises:
        ProtocolError: the table is not an object of such lists.
    """
    table = header.pop("pickles", None)
    if table is None:
        return []
    if type(table) is not dict:
        raise ProtocolError(f"Binary frame 'pickles' must be an object, got {type(table).__name__}")
    fields = []
    for wire_field, lengths in table.items():
        if (wire_field not in _WIRE_FIELDS or type(lengths) is not list or not lengths
                or any(type(length) is not int or length < 0 for length in lengths)):
            raise _bad_lengths(wire_field, lengths)
        fields.append((wire_field, lengths))
    return fields


def _segments_of(header: dict[str, Any], view: memoryview, start: int, end: int) -> None:
    """Replace the header's ``pickles`` table by :class:`_Segment` values under their
    wire fields (``args_pickle``...), checking the lengths against the body."""
    position = start
    for wire_field, lengths in _pickle_table(header):
        pieces = []
        for length in lengths:
            pieces.append(view[position:position + length])
            position += length
        if position > end:
            break
        header[wire_field] = _Segment(pieces[0], pieces[1:] if len(pieces) > 1 else _NO_BUFFERS)
    if position != end:
        raise ProtocolError(f"Binary frame segments add up to {position - start} bytes, "
                            f"but its body is {end - start} bytes")


def _header_of(view: memoryview, offset: int, start: int) -> dict[str, Any]:
    """The JSON header of the frame at ``offset`` (its body starts at ``start``).

    Raises:
        ProtocolError: not JSON, or not an object.
    """
    header = parse_json(view[offset + BINARY_PREFIX_BYTES:start])
    if type(header) is not dict:
        raise ProtocolError(f"A binary frame's header must be a JSON object, got {type(header).__name__}")
    return header


def _binary_frame(view: memoryview, offset: int) -> tuple[dict[str, Any], int]:
    """The header (with :class:`_Segment` values) of the frame at ``offset``, and its end."""
    available = len(view) - offset
    if available < BINARY_PREFIX_BYTES:
        raise ProtocolError(f"A binary frame starts with {BINARY_PREFIX_BYTES} bytes; got {available}")
    size, header_size = _frame_size(view, offset)
    if size > available:
        raise ProtocolError(f"Binary frame of {size} bytes is truncated: {available} bytes arrived")
    start = offset + BINARY_PREFIX_BYTES + header_size
    header = _header_of(view, offset, start)
    _segments_of(header, view, start, offset + size)
    return header, offset + size


class SplitFrame:
    """A binary frame that arrived in chunks, kept as one ``bytes`` per segment (each
    pickle and each out-of-band buffer) instead of one buffer for the whole frame
    (:class:`wove.framing.ChunkAssembler` builds it with :func:`chunked_layout` and
    :func:`split_frame`). A large ``bytes`` value is then its own buffer, and unpickling
    takes it as it is: no copy, so a 100 MiB result costs 100 MiB on arrival, not 200.
    :func:`decode_events` and :func:`decode_command` take it like bytes; ``len()`` is the
    frame's size, and ``bytes()`` joins the frame again (a copy, for a reader of raw frames)."""

    __slots__ = ("head", "header", "pieces", "size")

    def __init__(self, head: bytes, header: dict[str, Any], pieces: list[bytes], size: int) -> None:
        self.head = head  # the prefix and the JSON header, as they arrived
        self.header = header  # the parsed header, pickled fields as their segments
        self.pieces = pieces
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return self.head + b"".join(self.pieces)


#: what the decoders parse (anything else is taken as already-parsed frames)
_RECEIVED = (bytes, bytearray, memoryview, str, SplitFrame)


def chunked_layout(first: bytes | bytearray | memoryview) -> tuple[dict[str, Any], list[tuple[str, list[int]]], int] | None:
    """The layout of a binary frame from its first chunk ``first``: its header (without
    the ``pickles`` table), each pickled field's segment lengths in frame order, and where
    the body starts in ``first``. None when ``first`` does not hold the whole header or the
    table is not valid: the frame is then assembled whole and the parser says what is wrong.

    Raises:
        ProtocolError: ``first`` does not start with a binary frame's prefix.
    """
    view = memoryview(first)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    size, header_size = _frame_size(view, 0)
    start = BINARY_PREFIX_BYTES + header_size
    if len(view) < start:
        return None
    try:
        header = _header_of(view, 0, start)
        fields = _pickle_table(header)
    except ProtocolError:
        return None
    if sum(sum(lengths) for _, lengths in fields) != size - start:
        return None
    return header, fields, start


def split_frame(head: bytes, header: dict[str, Any], fields: list[tuple[str, list[int]]], pieces: list[bytes],
                size: int) -> SplitFrame:
    """The :class:`SplitFrame` of a frame that starts with ``head`` (its prefix and header),
    whose :func:`chunked_layout` was ``header`` and ``fields`` and whose segments arrived as
    ``pieces`` (one ``bytes`` each, in order)."""
    index = 0
    for wire_field, lengths in fields:
        data, buffers = pieces[index], pieces[index + 1:index + len(lengths)]
        index += len(lengths)
        header[wire_field] = _Segment(memoryview(data), buffers or _NO_BUFFERS)
    return SplitFrame(head, header, pieces, size)


def parse_frames(data: bytes | bytearray | memoryview | str | SplitFrame) -> Any:
    """Parse what arrived: JSON (an object or a list, as :func:`parse_json`) or binary
    frames (one frame as its object, several as a list; a :class:`SplitFrame` as its
    header), whose pickled fields are decoded by :func:`decode_command` / :func:`decode_events`.

    Raises:
        ProtocolError: the bytes are neither valid JSON nor valid binary frames.
    """
    if isinstance(data, SplitFrame):
        return data.header
    if not is_binary(data):
        return parse_json(data)
    view = memoryview(data)  # type: ignore[arg-type]
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    header, end = _binary_frame(view, 0)
    if end == len(view):
        return header
    frames = [header]
    while end < len(view):
        header, end = _binary_frame(view, end)
        frames.append(header)
    return frames


_json_decode = json.JSONDecoder().decode
_json_scan: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def _decode_text(text: str) -> Any:
    """``json.loads`` of a str, without its whitespace scans when the text has none."""
    try:
        value, end = _json_scan(text, 0)
    except StopIteration:  # leading whitespace, or not JSON: the full decoder says which
        return _json_decode(text)
    if end != len(text) and text[end:].strip():
        return _json_decode(text)  # raises "Extra data"
    return value


def parse_json(data: bytes | bytearray | memoryview | str) -> Any:
    """Parse JSON bytes, raising :class:`ProtocolError` (never anything else) on bad input."""
    try:
        if isinstance(data, str):
            return _decode_text(data)
        try:  # UTF-8, as every peer sends: skips json.loads' encoding detection
            return _decode_text(str(data, "utf-8"))
        except ValueError:  # a BOM, UTF-16/32 (json.loads reads them), or not JSON: its own error
            return json.loads(bytes(data))
    except (ValueError, TypeError, RecursionError) as exc:
        preview = data[:80] if isinstance(data, (bytes, str)) else type(data).__name__
        raise ProtocolError(f"Frame is not valid JSON ({exc}); received {preview!r}") from exc


def unpack_frame(wire: dict[str, Any]) -> dict[str, Any]:
    """Decode the ``*_pickle`` fields of a wire frame into Python values.

    Raises:
        ProtocolError: a pickled field is not a string, not base64, or does not unpickle.
    """
    frame = dict(wire)
    present = _WIRE_FIELDS.intersection(wire)
    for wire_field in present if len(present) < 2 else sorted(present, key=_FIELD_ORDER.__getitem__):
        field = _FIELD_OF[wire_field]
        text = frame.pop(wire_field)
        if isinstance(text, _Segment):
            frame[field] = _load_segment(field, wire_field, text)
            continue
        if not isinstance(text, str):
            raise ProtocolError(
                f"Field '{wire_field}' must be a base64 string, got {type(text).__name__}"
            )
        if field == "callable":
            cached = _DECODED.get(text)
            if cached is not None:
                frame[field] = cached
                continue
        frame[field] = _loads_text(wire_field, text)
        if field == "callable":
            _DECODED.remember(text, frame[field])
    return frame


def _loads_text(wire_field: str, text: str) -> Any:
    """Unpickle a base64 ``*_pickle`` field.

    Raises:
        ProtocolError: the text is not base64, or does not unpickle.
    """
    try:
        return dispatch.loads_b64(text)
    except MissingDispatchFeatureError:
        raise
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError(f"Field '{wire_field}' is not valid base64: {exc}") from exc
    except Exception as exc:
        raise ProtocolError(f"Field '{wire_field}' does not unpickle: {type(exc).__name__}: {exc}") from exc


def _load_segment(field: str, wire_field: str, segment: _Segment) -> Any:
    """Unpickle a binary frame's field; the out-of-band buffers are views of the frame."""
    key = bytes(segment.data) if field == "callable" else b""
    if key:
        cached = _DECODED.get(key)
        if cached is not None:
            return cached
    try:
        value = dispatch.loads(segment.data, segment.buffers or None)
    except MissingDispatchFeatureError:
        raise
    except Exception as exc:
        raise ProtocolError(f"Field '{wire_field}' does not unpickle: {type(exc).__name__}: {exc}") from exc
    if key:
        _DECODED.remember(key, value)
    return value


def _require_str(obj: dict[str, Any], key: str, frame_type: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise ProtocolError(
            f"'{frame_type}' frame needs a non-empty string '{key}', got {value!r:.80}"
        )
    return value


def _keyword_args(args: Any) -> dict[str, Any]:
    """A run_task's unpickled ``args`` (None: none).

    Raises:
        ProtocolError: they are not a dict of keyword arguments.
    """
    if args is None:
        return {}
    if not isinstance(args, dict):
        raise ProtocolError(f"'args' must unpickle to a dict of keyword arguments, got {type(args).__name__}")
    return args


#: a run_task as this runtime's client writes it (``_run_task_json``)
_USUAL_COMMAND = ("type", "run_id", "task_id", "delivery", "callable_pickle", "args_pickle")


def _usual_command(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The usual run_task (string ids, a delivery object, a callable decoded before, so
    cached, and base64 arguments) decoded with fewer steps; None, before anything is
    unpickled, for any other shape, which the general path decodes.

    Raises:
        ProtocolError: as the general path, for arguments that do not unpickle to a dict.
    """
    run_id, task_id, delivery = obj["run_id"], obj["task_id"], obj["delivery"]
    if (obj["type"] != "run_task" or type(run_id) is not str or not run_id or type(task_id) is not str
            or type(delivery) is not dict):
        return None
    text = obj["callable_pickle"]
    func = _DECODED.get(text) if type(text) is str else None
    args_text = obj["args_pickle"]
    if func is None or type(args_text) is not str:
        return None
    try:  # unpickled once, whatever comes of it
        args = _keyword_args(_loads_text("args_pickle", args_text))
    except ProtocolError as exc:
        exc.run_id = run_id  # type: ignore[attr-defined]
        exc.task_id = task_id  # type: ignore[attr-defined]
        raise
    return {"type": "run_task", "run_id": run_id, "task_id": task_id, "delivery": delivery, "callable": func,
            "args": args}


def decode_command(data: bytes | str | SplitFrame | dict[str, Any]) -> dict[str, Any]:
    """Decode one command frame from the wire (already-verified bytes, or parsed JSON).

    Raises:
        ProtocolError: the bytes are not a valid command. When the frame named a run,
            ``exc.run_id`` and ``exc.task_id`` are set so a worker can answer with a
            ``task_error`` for that run.
    """
    obj = parse_frames(data) if isinstance(data, _RECEIVED) else data
    if type(obj) is dict and len(obj) == 6 and tuple(obj) == _USUAL_COMMAND:
        frame = _usual_command(obj)
        if frame is not None:
            return frame
    if not isinstance(obj, dict):
        raise ProtocolError(f"A command must be a JSON object, got {type(obj).__name__}")
    frame_type = obj.get("type")
    if not isinstance(frame_type, str) or frame_type not in COMMAND_TYPES:
        raise ProtocolError(
            f"Unknown command type {frame_type!r:.60}; expected one of {sorted(COMMAND_TYPES)}"
        )
    if frame_type == "shutdown":
        return dict(obj)
    run_id = _require_str(obj, "run_id", frame_type)
    task_id = obj.get("task_id")
    try:
        if not isinstance(task_id, str):
            raise ProtocolError(f"'{frame_type}' frame needs a string 'task_id', got {task_id!r:.80}")
        if frame_type == "cancel_task":
            return dict(obj)
        if frame_type == "stream_credit":
            credit = obj.get("credit")
            if not isinstance(credit, int) or isinstance(credit, bool) or credit < 1:
                raise ProtocolError(f"'stream_credit' frame needs a positive integer 'credit', got {credit!r:.80}")
            return dict(obj)
        if "callable_pickle" not in obj:
            raise ProtocolError("'run_task' frame needs 'callable_pickle'")
        delivery = obj.get("delivery")
        if delivery is not None and not isinstance(delivery, dict):
            raise ProtocolError(f"'delivery' must be an object, got {type(delivery).__name__}")
        frame = unpack_frame(obj)
        args = _keyword_args(frame.get("args", {}))
        if not callable(frame.get("callable")):
            raise ProtocolError(f"'callable' unpickled to a non-callable {type(frame.get('callable')).__name__}")
        frame["args"] = args
        frame["delivery"] = delivery or {}
        return frame
    except ProtocolError as exc:
        exc.run_id = run_id  # type: ignore[attr-defined]
        exc.task_id = task_id if isinstance(task_id, str) else run_id.split(":", 1)[0]  # type: ignore[attr-defined]
        raise


def _event_list(obj: Any) -> list[Any]:
    if isinstance(obj, dict) and "events" in obj and "type" not in obj:
        events = obj["events"]
        if not isinstance(events, list):
            raise ProtocolError(f"'events' must be a list, got {type(events).__name__}")
        return events
    if isinstance(obj, list):
        return obj
    return [obj]


def decode_events(data: bytes | str | Any) -> list[dict[str, Any]]:
    """Decode events: one event object, a list of them, or ``{"events": [...]}``.

    A result or exception that does not unpickle on this side does not lose the run:
    the event becomes a ``task_error`` (source ``executor``) that says why.

    Raises:
        ProtocolError: the data is not JSON, not an event shape, or an event lacks its
            ``type``, ``run_id`` or ``task_id``.
    """
    obj = parse_frames(data) if isinstance(data, _RECEIVED) else data
    if type(obj) is dict:  # one event, most often the usual result
        usual = _usual_result(obj)
        if usual is not None:
            return [usual]
    events: list[dict[str, Any]] = []
    for raw in _event_list(obj):
        usual = _usual_result(raw)
        if usual is not None:
            events.append(usual)
            continue
        if not isinstance(raw, dict):
            raise ProtocolError(f"An event must be a JSON object, got {type(raw).__name__}")
        event_type = raw.get("type")
        if not isinstance(event_type, str) or event_type not in EVENT_TYPES:
            raise ProtocolError(
                f"Unknown event type {event_type!r:.60}; expected one of {sorted(EVENT_TYPES)}"
            )
        if event_type == "log":
            events.append(dict(raw))
            continue
        run_id = _require_str(raw, "run_id", event_type)
        task_id = raw.get("task_id")
        if not isinstance(task_id, str):
            raise ProtocolError(f"'{event_type}' event needs a string 'task_id', got {task_id!r:.80}")
        events.append(_unpack_event(raw, run_id, task_id))
    return events


def _usual_result(raw: Any) -> dict[str, Any] | None:
    """The usual result (exactly type, run_id, task_id and result_pickle, all strings)
    decoded in one step, or None for anything else, or when it does not decode: the
    general path then checks it and reports what is wrong as for any event."""
    if type(raw) is not dict or len(raw) != 4 or raw.get("type") != "task_result":
        return None
    run_id, task_id, text = raw.get("run_id"), raw.get("task_id"), raw.get("result_pickle")
    if type(run_id) is not str or not run_id or type(task_id) is not str or type(text) is not str:
        return None
    try:
        return {"type": "task_result", "run_id": run_id, "task_id": task_id, "result": dispatch.loads_b64(text)}
    except Exception:
        return None


def _unpack_event(raw: dict[str, Any], run_id: str, task_id: str) -> dict[str, Any]:
    if _WIRE_FIELDS.isdisjoint(raw):
        event = dict(raw)
    else:
        try:
            event = unpack_frame(raw)
        except ProtocolError as exc:
            if "exception_pickle" in raw and "result_pickle" not in raw:
                # The error payload still says what happened; only the exception object is lost.
                trimmed = {k: v for k, v in raw.items() if k != "exception_pickle"}
                event = _unpack_event(trimmed, run_id, task_id)
                event["exception_unpickle_error"] = str(exc)
                return event
            return error_event(
                run_id,
                task_id,
                kind="ProtocolError",
                message=f"The worker's {raw.get('type')} for run {run_id} could not be decoded here: {exc}",
                source="executor",
            )
    if event.get("type") == "task_error":
        error = event.get("error")
        if not isinstance(error, dict):
            event["error"] = {
                "kind": "ExecutionError",
                "message": str(error) if error is not None else "Task failed without an error payload.",
                "traceback": "",
                "retryable": False,
                "source": "executor",
            }
    return event


def encode_event(event: dict[str, Any], *, binary: bool = False) -> bytes:
    """Encode an event (as JSON, or with ``binary`` as a binary frame); never raises.

    A worker must never lose a run because its result does not serialize: a terminal
    event that cannot be encoded (an unpicklable result, one nested deeper than the stack,
    a ``__reduce__`` that raises) becomes a ``task_error`` naming the task and the path to
    the offending object; any other event that cannot be encoded becomes a ``log`` event
    saying so.
    """
    if binary:
        return b"".join(encode_event_parts(event))
    return _encode_safely(event, encode_frame)


def encode_event_parts(event: dict[str, Any]) -> list[bytes | memoryview]:
    """:func:`encode_event` as a binary frame in parts (:func:`encode_binary_parts`), for
    a writer that sends them without joining, or joins many events once; never raises."""
    return _encode_safely(event, encode_binary_parts)


def _encode_safely(event: dict[str, Any], encode: Callable[[dict[str, Any]], T]) -> T:
    try:
        return encode(event)
    except Exception as exc:  # DispatchError, RecursionError, a __reduce__ that raises...
        if event.get("type") == "task_yield":
            # an item that cannot be sent ends the stream where it happened (the worker's
            # generator is closed when the client answers with cancel_task)
            return encode(error_event(
                str(event.get("run_id")), str(event.get("task_id")), kind=type(exc).__name__, source="executor",
                message=f"Item {event.get('seq')} of the streamed run {event.get('run_id')} cannot be sent back: {exc}",
            ))
        if event.get("type") not in TERMINAL_EVENTS:
            logger.warning("could not encode a %s event: %s: %s", event.get("type"), type(exc).__name__, exc)
            return encode({"type": "log", "message": (
                f"A {event.get('type')} event of run {event.get('run_id')} could not be encoded: "
                f"{type(exc).__name__}: {exc}")})
        replacement = error_event(
            str(event.get("run_id")),
            str(event.get("task_id")),
            kind=type(exc).__name__,
            message=f"The {event.get('type')} of run {event.get('run_id')} cannot be sent back: {exc}",
            source="executor",
        )
        return encode(replacement)


def encode_events(events: list[dict[str, Any]], framing: Literal["envelope", "lines"] = "envelope", *,
                  binary: bool = False) -> bytes:
    """Encode several events as one body: ``{"events": [...]}`` (what Wove 2.x clients
    read from HTTP and gRPC) or ``lines``, one event per line (NDJSON, stdio); with
    ``binary``, the binary frames one after another (each says its own length). Every
    event goes through :func:`encode_event`, so none is lost to an encoding failure."""
    if binary:  # one join: a large buffer is copied once, into the body
        return b"".join([part for event in events for part in encode_event_parts(event)])
    encoded = [encode_event(event) for event in events]
    if framing == "lines":
        return b"".join(item + b"\n" for item in encoded)
    return b'{"events":[' + b",".join(encoded) + b"]}"
