"""Pickling of callables, arguments, results and exceptions (cloudpickle, extra ``dispatch``).

cloudpickle is imported on first use only, so ``import wove`` stays light and the
in-process executor works without it.
"""

from __future__ import annotations

import base64
import binascii
import importlib
import io
import pickle
import sys
from typing import Any

from .errors import DispatchError, MissingDispatchFeatureError

__all__ = [
    "OUT_OF_BAND_MIN_BYTES",
    "dumps",
    "dumps_b64",
    "dumps_out_of_band",
    "find_unpicklable",
    "loads",
    "loads_b64",
    "memoryview_from_buffer",
    "require_dispatch",
]

#: Buffers at least this large travel out of band in binary frames (pickle protocol 5);
#: smaller ones are copied into the pickle, which costs less than a separate segment.
OUT_OF_BAND_MIN_BYTES = 16 * 1024

_cloudpickle: Any = None


def require_dispatch(reason: str) -> Any:
    """Return the cloudpickle module.

    Raises:
        MissingDispatchFeatureError: cloudpickle is not installed; the message says why it
            was needed and the exact install command.
    """
    global _cloudpickle
    if _cloudpickle is None:
        try:
            _cloudpickle = importlib.import_module("cloudpickle")
        except ImportError as exc:
            raise MissingDispatchFeatureError(reason) from exc
    return _cloudpickle


_REASON = "task callables, arguments and results cross a process or network boundary."


def dumps(value: Any, *, what: str = "value") -> bytes:
    """Pickle ``value`` with cloudpickle.

    Args:
        value: the object to pickle.
        what: how the value is named in an error, such as ``"args of task 'report'"``
            or ``"args"``; the path to the offending object is appended.

    Raises:
        DispatchError: the value (or something inside it) cannot be pickled.
    """
    cloudpickle = require_dispatch(_REASON)
    try:
        return cloudpickle.dumps(value)  # type: ignore[no-any-return]
    except Exception as exc:
        raise _pickling_error(value, what, exc) from exc


def _pickling_error(value: Any, what: str, exc: Exception) -> DispatchError:
    path, culprit = find_unpicklable(value, what)
    return DispatchError(
        f"Cannot pickle {path}: {type(culprit).__name__} ({type(exc).__name__}: {exc}). "
        "Values sent to another process must be picklable; pass what the task needs to "
        "rebuild it (a path, a URL, an id) instead."
    )


def loads(data: bytes | memoryview, buffers: list[memoryview] | list[bytes] | None = None) -> Any:
    """Unpickle bytes produced by :func:`dumps`, or by :func:`dumps_out_of_band` with the
    out-of-band ``buffers`` it returned (in order; they arrive as views of the frame, or as
    ``bytes`` of their own, which a ``bytes`` value then is, without a copy)."""
    if buffers:
        return _OutOfBandUnpickler(data, buffers).load()
    return require_dispatch(_REASON).loads(data)


def memoryview_from_buffer(buffer: Any, format: str, shape: tuple[int, ...]) -> memoryview:
    """A ``memoryview`` of ``format`` and ``shape`` over ``buffer`` (no copy).

    A view that arrives out of band is read-only when the receiving buffer is (as Ray's
    zero-copy arrays are); copy it (``bytearray(view)``) to change it.
    """
    view = memoryview(buffer)
    if view.format != format or view.shape != tuple(shape):
        flat: Any = view.cast("B")  # cast() is typed per format literal; ours is a runtime string
        view = flat.cast(format, list(shape)) if len(shape) != 1 else flat.cast(format)
    return view


class _Buffers:
    """The persistent ids of a protocol-5 pickle whose large buffers travel out of band.

    ``bytes`` and ``bytearray`` (which the C pickler writes in band without asking
    ``reducer_override`` or ``buffer_callback``) and the ``PickleBuffer`` of a numpy array
    (or any object that reduces to one) of at least
    :data:`OUT_OF_BAND_MIN_BYTES`, and every ``memoryview`` (which plain pickle refuses),
    become ``(kind, index, ...)`` ids; their memory is appended to :attr:`buffers`.
    """

    __slots__ = ("buffers",)

    def __init__(self) -> None:
        self.buffers: list[memoryview] = []

    def persistent_id(self, obj: Any) -> Any:
        kind = type(obj)
        if kind is bytes or kind is bytearray:
            if len(obj) < OUT_OF_BAND_MIN_BYTES:
                return None
            self.buffers.append(memoryview(obj))
            return ("b" if kind is bytes else "a", len(self.buffers) - 1)
        if kind is pickle.PickleBuffer:
            try:
                raw = obj.raw()
            except BufferError:  # not contiguous: in band
                return None
            if raw.nbytes < OUT_OF_BAND_MIN_BYTES:
                return None
            self.buffers.append(raw)
            return ("p", len(self.buffers) - 1)
        if kind is memoryview:
            view = obj if obj.c_contiguous else memoryview(obj.tobytes())
            self.buffers.append(view.cast("B") if view.format != "B" or view.ndim != 1 else view)
            return ("m", len(self.buffers) - 1, obj.format, list(obj.shape or ()))
        return None


class _OutOfBandUnpickler(pickle.Unpickler):
    """Resolves the persistent ids of :class:`_Buffers` against the received buffers."""

    def __init__(self, data: bytes | memoryview, buffers: list[memoryview] | list[bytes]) -> None:
        super().__init__(io.BytesIO(data))
        self._buffers = buffers

    def persistent_load(self, pid: Any) -> Any:
        try:
            kind, index = pid[0], pid[1]
            buffer = self._buffers[index]
            if kind == "b":
                return bytes(buffer)  # a buffer that is bytes already is the value itself
            if kind == "a":
                return bytearray(buffer)
            if kind == "p":
                return buffer
            if kind == "m":
                return memoryview_from_buffer(buffer, pid[2], tuple(pid[3]))
        except (TypeError, IndexError, ValueError, KeyError) as exc:
            raise pickle.UnpicklingError(f"Bad out-of-band buffer reference {pid!r:.80}: {exc}") from exc
        raise pickle.UnpicklingError(f"Unknown out-of-band buffer reference {pid!r:.80}")


class _FastPickler(pickle.Pickler):
    """The C pickler with out-of-band buffers (values of builtin types)."""

    def __init__(self, file: io.BytesIO, buffers: _Buffers) -> None:
        super().__init__(file, protocol=5)
        self._oob = buffers

    def persistent_id(self, obj: Any) -> Any:
        return self._oob.persistent_id(obj)


_cloud_pickler_class: Any = None


def _cloud_pickler() -> Any:
    global _cloud_pickler_class
    if _cloud_pickler_class is None:
        base = require_dispatch(_REASON).Pickler

        class OutOfBandPickler(base):  # type: ignore[misc, valid-type]
            """cloudpickle's pickler with out-of-band buffers."""

            def __init__(self, file: io.BytesIO, buffers: _Buffers) -> None:
                super().__init__(file, protocol=5)
                self._oob = buffers

            def persistent_id(self, obj: Any) -> Any:
                return self._oob.persistent_id(obj)

        _cloud_pickler_class = OutOfBandPickler
    return _cloud_pickler_class


def dumps_out_of_band(value: Any, *, what: str = "value", simple: bool = False,
                      large_buffers: bool = True) -> tuple[bytes, list[memoryview]]:
    """Pickle ``value`` with protocol 5, large buffers out of band: ``(pickle, buffers)``.

    ``bytes``, ``bytearray``, ``memoryview`` and buffer-protocol objects that support
    protocol 5 (numpy arrays) of at least :data:`OUT_OF_BAND_MIN_BYTES` are not copied into
    the pickle: the buffers are views of their memory, sent after it (binary frames,
    docs/wire.md), and :func:`loads` resolves them. ``simple`` says ``value`` holds only
    builtin types (the C pickler suffices), and ``large_buffers=False`` that none of them
    is a large buffer or a memoryview.

    Raises:
        DispatchError: the value (or something inside it) cannot be pickled.
    """
    if simple and not large_buffers:
        return pickle.dumps(value, protocol=5), []
    buffers = _Buffers()
    stream = io.BytesIO()
    try:
        (_FastPickler if simple else _cloud_pickler())(stream, buffers).dump(value)
    except Exception as exc:
        if simple:
            raise
        raise _pickling_error(value, what, exc) from exc
    return stream.getvalue(), buffers.buffers


def dumps_b64(value: Any, *, what: str = "value") -> str:
    """Pickle ``value`` and return it as ASCII base64 (the wire's ``*_pickle`` fields)."""
    return base64.b64encode(dumps(value, what=what)).decode("ascii")


if sys.version_info >= (3, 11):
    def b64decode(text: str) -> bytes:
        """Strict base64 decoding (faster than ``base64.b64decode(validate=True)``)."""
        return binascii.a2b_base64(text, strict_mode=True)
else:  # pragma: no cover - Python 3.10
    def b64decode(text: str) -> bytes:
        """Strict base64 decoding."""
        return base64.b64decode(text, validate=True)


def loads_b64(text: str) -> Any:
    """Inverse of :func:`dumps_b64`."""
    if _cloudpickle is None:
        require_dispatch(_REASON)
    return _cloudpickle.loads(b64decode(text))


def _picklable(value: Any) -> bool:
    try:
        _cloudpickle.dumps(value)
    except Exception:
        return False
    return True


def _children(value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [(f"[{key!r}]", item) for key, item in value.items()]
    if isinstance(value, (list, tuple, set, frozenset)):
        return [(f"[{index}]", item) for index, item in enumerate(value)]
    state = getattr(value, "__dict__", None)
    if isinstance(state, dict):
        return [(f".{name}", item) for name, item in state.items()]
    return []


def find_unpicklable(value: Any, path: str = "value", _depth: int = 0) -> tuple[str, Any]:
    """Return ``(path, object)`` for the innermost part of ``value`` that does not pickle.

    The path reads like Python (``args['report'].conn``) so an error can point at it.
    """
    require_dispatch(_REASON)
    if _depth < 16:
        for suffix, child in _children(value):
            if not _picklable(child):
                return find_unpicklable(child, path + suffix, _depth + 1)
    return path, value
