"""PEM material from bytes, PEM text or a file path (executor and server TLS options)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def read_pem(value: Any, what: str) -> bytes | None:
    """Return PEM bytes for ``value`` (None passes through).

    Args:
        value: bytes, PEM text, or a path (str or Path) to a PEM file.
        what: how the value is named in an error (``executor_config.root_certificates``).

    Raises:
        ValueError: a path that cannot be read (names it and the fix).
        TypeError: any other kind of value.
    """
    if value is None or isinstance(value, bytes):
        return value
    if not isinstance(value, (str, Path)):
        raise TypeError(f"{what} must be bytes, PEM text or a file path, got {type(value).__name__}.")
    text = str(value)
    if "-----BEGIN" in text:
        return text.encode("ascii")
    try:
        return Path(text).read_bytes()
    except OSError as exc:
        raise ValueError(
            f"{what} is neither PEM text nor a readable file ({text!r}: {exc}). "
            "Pass a PEM file path, PEM text or bytes."
        ) from exc
