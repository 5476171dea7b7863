"""Caches and fast paths behind :mod:`wove.protocol` (the wire format does not change).

Pickling a task's callable by value costs tens of microseconds on each side of a wire,
more than the rest of a no-op run. Two caches avoid it where that cannot change what a
task observes:

* the submitter reuses the pickled form of a callable whose pickle cannot have changed:
  importable functions (pickled by reference), and functions pickled by value that
  capture no mutable state (no closure, no function attributes, scalar defaults, and
  every global they name bound to a module, a builtin, an importable function or class,
  or an immutable scalar; the identity of those values is part of the cache key);
* the worker reuses the unpickled callable for identical pickled bytes under the same
  rule, and only when its code never assigns a global (so runs cannot share state that a
  fresh unpickle would not have given them).

Values made only of builtin scalars and containers are pickled with the C pickler
(byte-identical to cloudpickle's output for them).
"""

from __future__ import annotations

import base64
import binascii
import dis
import importlib
import pickle
import sys
import types
from collections import OrderedDict
from typing import Any

from . import dispatch

__all__ = ["CallableCache", "DecodedCallables", "fast_b64", "fast_pickle"]

_SCALARS = (int, float, str, bytes, bool, type(None), complex)
#: the types a flat argument dict may hold for the one-pass check of :func:`fast_b64`
_FLAT = frozenset({int, float, str, bool, type(None)})
#: flat dicts up to this many keys take that check (larger ones the bounded walk)
_FLAT_KEYS = 16
_CONTAINERS = (list, tuple, dict, set, frozenset)
_MISSING = object()
# Opcodes are numbered differently in each Python version (3.13 renumbered them all):
# look them up by name, never by number.
_STORE_GLOBAL = frozenset(dis.opmap[name] for name in ("STORE_GLOBAL", "DELETE_GLOBAL"))
_CACHE_SIZE = 256
_MAX_CACHED_PICKLE = 64 * 1024
_NODE_BUDGET = 10_000

_code_info_cache: dict[types.CodeType, tuple[tuple[str, ...], bool]] = {}


def _by_reference(obj: Any) -> bool:
    """True when cloudpickle pickles ``obj`` by reference (an importable name).

    Uses cloudpickle's own rule where its (private) helper exists; otherwise the same rule
    written here: the object is what its module's attribute of that qualified name holds,
    and the module is importable and not ``__main__``.
    """
    try:
        cloudpickle = dispatch.require_dispatch("pickling task callables")
    except Exception:
        return False
    check = getattr(getattr(cloudpickle, "cloudpickle", None), "_should_pickle_by_reference", None)
    try:
        return bool(check(obj)) if check is not None else _importable(obj)
    except Exception:
        return False


def _importable(obj: Any) -> bool:
    """True when ``obj`` is found again by importing its module and walking its qualname."""
    module_name = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not module_name or not qualname or module_name == "__main__" or "<locals>" in qualname:
        return False
    module = sys.modules.get(module_name)
    if module is None:
        try:
            module = importlib.import_module(module_name)
        except Exception:
            return False
    found: Any = module
    for part in qualname.split("."):
        found = getattr(found, part, _MISSING)
        if found is _MISSING:
            return False
    return found is obj


def _code_info(code: types.CodeType) -> tuple[tuple[str, ...], bool]:
    """Names a code object (and nested ones) may read as globals; whether it stores globals."""
    info = _code_info_cache.get(code)
    if info is not None:
        return info
    names: set[str] = set()
    stores = False
    stack = [code]
    while stack:
        current = stack.pop()
        names.update(current.co_names)
        if not stores:
            stores = any(ins.opcode in _STORE_GLOBAL for ins in dis.get_instructions(current))
        stack.extend(const for const in current.co_consts if isinstance(const, types.CodeType))
    info = (tuple(sorted(names)), stores)
    if len(_code_info_cache) > 4096:
        _code_info_cache.clear()
    _code_info_cache[code] = info
    return info


def _stable_value(value: Any) -> bool:
    if type(value) in _SCALARS or isinstance(value, (types.ModuleType, types.BuiltinFunctionType)):
        return True
    if isinstance(value, (types.FunctionType, type)):
        return _by_reference(value)
    return False


def _stable_key(func: types.FunctionType) -> tuple[tuple[Any, ...], tuple[Any, ...]] | None:
    """A key that changes whenever the by-value pickle of ``func`` could change, or None
    when ``func`` may carry mutable state (then it is never cached).

    The key is ``(objects compared by identity, values compared by equality)``; holding
    the objects keeps their ids from being reused.
    """
    if func.__closure__ or func.__dict__:
        return None
    defaults = func.__defaults__ or ()
    kwdefaults = func.__kwdefaults__ or {}
    if any(type(d) not in _SCALARS for d in (*defaults, *kwdefaults.values())):
        return None
    names, stores = _code_info(func.__code__)
    if stores:
        return None
    scope = func.__globals__
    objects: list[Any] = [func.__code__]
    for name in names:
        value = scope.get(name, _MISSING)
        if value is _MISSING:
            continue
        if not _stable_value(value):
            return None
        objects.append(value)
    values = (defaults, tuple(map(type, defaults)), tuple((k, v, type(v)) for k, v in sorted(kwdefaults.items())), func.__name__, func.__qualname__,
              func.__module__, len(objects))
    return tuple(objects), values


def _snapshot(func: Any) -> tuple[Any, ...]:
    """What a by-value function's pickle depends on, for identity checks: its code,
    defaults, closure, attributes, and the object bound to every global name it reads
    (a missing name included, so binding it later is noticed)."""
    names, _stores = _code_info(func.__code__)
    scope = func.__globals__
    return (func.__code__, func.__defaults__, func.__kwdefaults__,
            tuple((name, scope.get(name, _MISSING)) for name in names))


def _unchanged(func: Any, snapshot: tuple[Any, ...]) -> bool:
    """True when nothing in ``snapshot`` was rebound since it was taken (the bound objects
    were checked stable then; identity is enough)."""
    code, defaults, kwdefaults, pairs = snapshot
    if (func.__code__ is not code or func.__defaults__ is not defaults
            or func.__kwdefaults__ is not kwdefaults or func.__closure__ or func.__dict__):
        return False
    get = func.__globals__.get
    return all(get(name, _MISSING) is value for name, value in pairs)


def _same_key(a: Any, b: Any) -> bool:
    if a == "ref" or b == "ref":
        return a == b
    return (len(a[0]) == len(b[0]) and all(x is y for x, y in zip(a[0], b[0])) and a[1] == b[1])


class CallableCache:
    """Submitter side: pickled (base64) callables, reused while they cannot have changed."""

    def __init__(self, size: int = _CACHE_SIZE) -> None:
        self._size = size
        # id(func) -> (func, key, b64, snapshot or None for by-reference, pickle); the
        # strong reference keeps the id from being reused
        self._entries: OrderedDict[int, tuple[Any, Any, str, tuple[Any, ...] | None, bytes]] = OrderedDict()

    def _key(self, func: Any) -> Any:
        if isinstance(func, types.FunctionType):
            if _by_reference(func):
                return "ref"
            return _stable_key(func)
        if isinstance(func, types.BuiltinFunctionType) or (isinstance(func, type) and _by_reference(func)):
            return "ref"
        return None

    def encode(self, func: Any) -> str | None:
        """The base64 pickle of ``func``, or None when it must be pickled afresh."""
        entry = self._lookup(func)
        return None if entry is None else entry[2]

    def encode_raw(self, func: Any) -> bytes | None:
        """The pickle of ``func`` (for binary frames), or None when it must be pickled afresh."""
        entry = self._lookup(func)
        return None if entry is None else entry[4]

    def _lookup(self, func: Any) -> tuple[Any, Any, str, tuple[Any, ...] | None, bytes] | None:
        entry = self._entries.get(id(func))
        if entry is not None and entry[0] is func and (entry[3] is None or _unchanged(func, entry[3])):
            return entry  # the hot path: identity checks only
        key = self._key(func)
        if key is None:
            return None
        if entry is not None and entry[0] is func and _same_key(entry[1], key):
            self._entries.move_to_end(id(func))
            return entry
        try:
            raw = dispatch.dumps(func, what="callable")
        except Exception:
            return None  # the regular path raises the proper DispatchError
        if len(raw) > _MAX_CACHED_PICKLE:
            return None
        snapshot = None if key == "ref" else _snapshot(func)
        entry = (func, key, base64.b64encode(raw).decode("ascii"), snapshot, raw)
        self._entries[id(func)] = entry
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return entry


class DecodedCallables:
    """Worker side: unpickled callables for identical pickled bytes (see the module docstring)."""

    def __init__(self, size: int = _CACHE_SIZE) -> None:
        self._size = size
        # base64 text (JSON frames) or pickle bytes (binary frames) -> callable
        self._entries: OrderedDict[str | bytes, Any] = OrderedDict()

    def get(self, text: str | bytes) -> Any:
        func = self._entries.get(text, _MISSING)
        if func is not _MISSING:
            self._entries.move_to_end(text)
            return func
        return None

    def remember(self, text: str | bytes, func: Any) -> None:
        if len(text) > _MAX_CACHED_PICKLE:
            return
        if isinstance(func, types.FunctionType):
            if not _by_reference(func) and _stable_key(func) is None:
                return
        elif not isinstance(func, types.BuiltinFunctionType):
            return
        self._entries[text] = func
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)


def _simple(value: Any, budget: list[int]) -> bool:
    """True when ``value`` holds only builtin scalars and containers (bounded walk);
    ``budget[1]`` becomes 1 when it holds a buffer that binary frames send out of band."""
    budget[0] -= 1
    if budget[0] < 0:
        return False
    kind = type(value)
    if (kind is bytes or kind is bytearray) and len(value) >= dispatch.OUT_OF_BAND_MIN_BYTES:
        budget[1] = 1
        return True
    if kind in _SCALARS or kind is bytearray:
        return True
    if kind is dict:
        return all(_simple(k, budget) and _simple(v, budget) for k, v in value.items())
    if kind in _CONTAINERS:
        return all(_simple(item, budget) for item in value)
    return False


_EMPTY_DICT_B64 = base64.b64encode(pickle.dumps({}, protocol=5)).decode("ascii")
_NONE_B64 = base64.b64encode(pickle.dumps(None, protocol=5)).decode("ascii")


def fast_b64(value: Any) -> str | None:
    """Base64 pickle of a value made only of builtin scalars and containers (the C pickler,
    byte-identical to cloudpickle for them), or None for anything else."""
    if value is None:
        return _NONE_B64
    if type(value) is dict:
        if not value:
            return _EMPTY_DICT_B64
        if len(value) <= _FLAT_KEYS:  # the usual arguments: str keys, scalar values
            for key, item in value.items():
                if type(key) is not str or type(item) not in _FLAT:
                    break
            else:
                return binascii.b2a_base64(pickle.dumps(value, protocol=5), newline=False).decode("ascii")
    try:
        if not _simple(value, [_NODE_BUDGET, 0]):
            return None
        return binascii.b2a_base64(pickle.dumps(value, protocol=5), newline=False).decode("ascii")
    except RecursionError:  # nested deeper than the stack: the regular path reports it
        return None


_EMPTY_DICT = pickle.dumps({}, protocol=5)
_NONE = pickle.dumps(None, protocol=5)


def fast_pickle(value: Any) -> tuple[bytes, list[memoryview]] | None:
    """:func:`fast_b64` for binary frames: the pickle and its out-of-band buffers
    (:func:`wove.dispatch.dumps_out_of_band`), or None for values not of builtin types."""
    if value is None:
        return _NONE, []
    if type(value) is dict and not value:
        return _EMPTY_DICT, []
    budget = [_NODE_BUDGET, 0]
    try:
        if not _simple(value, budget):
            return None
        return dispatch.dumps_out_of_band(value, simple=True, large_buffers=bool(budget[1]))
    except RecursionError:
        return None
