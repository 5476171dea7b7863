"""``progress=True``: a live progress bar for ``map`` on a terminal (tqdm, extra ``progress``).

:func:`reporter_for` turns a ``progress`` argument into the callable a
:class:`~wove.futures.MapIterator` calls with each :class:`~wove.futures.MapProgress`:
``False`` → none; a callable → itself; ``True`` → a :class:`TerminalProgress` when stderr
is a terminal, else none (nothing is printed to a file, a pipe or a CI log). tqdm is
imported only for ``progress=True``; when it is missing, the error says what to install.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, TextIO

from .futures import MapProgress

__all__ = ["PROGRESS_INSTALL", "TerminalProgress", "reporter_for"]

PROGRESS_INSTALL = 'pip install "wove-core[progress]"'


class TerminalProgress:
    """A tqdm bar: finished/total, rate and ETA, with failed and in-flight counts."""

    def __init__(self, description: str, stream: TextIO) -> None:
        tqdm = _require_tqdm()
        try:
            size = os.get_terminal_size(stream.fileno())
        except (AttributeError, OSError, ValueError):
            size = os.terminal_size((0, 0))
        sized = size.columns > 0 and size.lines > 0
        # a terminal that reports no size (a fresh pty) gets 80x24: tqdm would hide the bar
        self._bar = tqdm(total=None, desc=description, unit="run", file=stream, leave=True,
                         dynamic_ncols=sized, ncols=None if sized else 80, nrows=None if sized else 24)
        self._seen = 0
        self._total: int | None = None
        self._closed = False

    def __call__(self, progress: MapProgress) -> None:
        if self._closed:
            return
        bar = self._bar
        if progress.total is not None and self._total is None:
            self._total = progress.total
            bar.total = progress.total
        finished = progress.done + progress.failed
        bar.set_postfix_str(f"failed={progress.failed}, in_flight={progress.in_flight}", refresh=False)
        if finished > self._seen:
            bar.update(finished - self._seen)
            self._seen = finished
        if progress.finished:
            self._closed = True
            bar.refresh()
            bar.close()


def _require_tqdm() -> Any:
    try:
        from tqdm import tqdm
    except ImportError as exc:
        raise ImportError(
            f"progress=True shows a progress bar with tqdm, which is not installed. Install it with: "
            f"{PROGRESS_INSTALL} (or pip install tqdm), or pass progress=<callable> to receive the "
            f"counts (done, failed, in_flight, total) yourself.",
            name="tqdm",
        ) from exc
    return tqdm


def reporter_for(progress: bool | Callable[[MapProgress], object], description: str,
                 stream: TextIO | None = None) -> Callable[[MapProgress], object] | None:
    """The reporter for a ``progress`` argument (see the module docstring).

    Raises:
        ImportError: ``progress=True`` and tqdm is not installed (names the install command).
        TypeError: ``progress`` is neither a bool nor a callable.
    """
    if progress is False or progress is None:
        return None
    if progress is True:
        out: Any = stream if stream is not None else sys.stderr
        if out is None:
            return None
        _require_tqdm()  # missing tqdm is an error on a terminal or not: found early, not in production
        isatty = getattr(out, "isatty", None)
        if isatty is None or not isatty():
            return None
        return TerminalProgress(description, out)
    if callable(progress):
        return progress
    raise TypeError(
        f"progress must be True, False or a callable taking a MapProgress, got {type(progress).__name__} "
        f"({progress!r})."
    )
