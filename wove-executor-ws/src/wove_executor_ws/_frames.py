"""Which frames go binary, and how a binary message is cut into WebSocket fragments.

Binary frames (:func:`wove.protocol.encode_binary_parts`) save base64 and a copy of every
large buffer, but for a small frame they cost more than JSON: measured on the no-op
command and its result (CPython 3.11), encoding ~9.1 µs vs ~6.6 µs and decoding ~8.0 µs
vs ~4.8 µs. So once binary frames are negotiated, a frame is sent binary only when it
carries something bulky (:func:`bulky`): a string or bytes over :data:`BULKY_BYTES`, a
buffer (bytearray, memoryview, an array), a container of many items, or any other
object (which may hold anything). Everything else (the no-op command, small scalar
arguments and results) stays JSON, exactly as before, so small tasks do not get slower.

A binary message under :data:`FRAGMENT_BYTES` is joined into one WebSocket frame (one
``send_binary`` costs ~2 µs; the same message in fragments ~6 µs); a larger one is sent
as fragments (:func:`fragments`): the large buffers as they are (views of the user's
data), the small parts around them merged.
"""

from __future__ import annotations

import types
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["BULKY_BYTES", "FRAGMENT_BYTES", "bulky", "bulky_command", "bulky_event", "fragments"]

#: A str or bytes value longer than this makes its frame binary (base64 and JSON escaping
#: then cost more than the binary frame's fixed overhead).
BULKY_BYTES = 4096
#: Items (elements, keys and values) looked at before a frame counts as bulky.
_ITEM_BUDGET = 256
#: Binary messages from this size are written as fragments instead of joined.
FRAGMENT_BYTES = 256 * 1024
#: Parts below this are merged with their neighbours into one fragment.
_MERGE_BYTES = 64 * 1024

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


def bulky_command(frame: Mapping[str, Any]) -> bool:
    """True when a ``run_task`` is worth a binary frame: bulky arguments or a callable
    that carries data (a closure over a large value, a ``functools.partial``...)."""
    args = frame.get("args")
    if args and bulky(args):
        return True
    func = frame.get("callable")
    if type(func) is types.FunctionType and func.__closure__ is None and func.__defaults__ is None:
        return False  # the common case, decided without a call
    return _bulky_callable(func)


def bulky_event(event: Mapping[str, Any]) -> bool:
    """True when an event is worth a binary frame: a bulky result, streamed item or
    exception object."""
    get = event.get
    return bulky(get("result")) or bulky(get("item")) or bulky(get("exception"))


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
