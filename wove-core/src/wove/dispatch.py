"""Pickling of callables, arguments, results and exceptions (cloudpickle, extra ``dispatch``).

cloudpickle is imported on first use only, so ``import wove`` stays light and the
in-process executor works without it.
"""

from __future__ import annotations

import base64
import binascii
import importlib
import sys
from typing import Any

from .errors import DispatchError, MissingDispatchFeatureError

__all__ = ["dumps", "dumps_b64", "find_unpicklable", "loads", "loads_b64", "require_dispatch"]

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
        path, culprit = find_unpicklable(value, what)
        raise DispatchError(
            f"Cannot pickle {path}: {type(culprit).__name__} ({type(exc).__name__}: {exc}). "
            "Values sent to another process must be picklable; pass what the task needs to "
            "rebuild it (a path, a URL, an id) instead."
        ) from exc


def loads(data: bytes) -> Any:
    """Unpickle bytes produced by :func:`dumps`."""
    return require_dispatch(_REASON).loads(data)


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
