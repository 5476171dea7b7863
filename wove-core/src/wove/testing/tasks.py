"""Task functions for tests of executors and worker services (``from wove.testing import tasks``).

Importable in any worker process wherever wove-core is installed, and without pytest, so
a task is pickled by reference (``wove.testing.tasks.add``) and a worker unpickles it by
importing this module.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any


def _write(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically, so a test that sees the file sees its content."""
    partial = f"{path}.{os.getpid()}.{threading.get_ident()}.partial"
    Path(partial).write_text(text)
    os.replace(partial, path)


class ContractTaskError(Exception):
    """Raised by :func:`fail` so a test can check the task's own exception comes back."""


async def echo(value: Any) -> Any:
    return value


def add(a: int, b: int) -> int:
    return a + b


async def fail(message: str) -> None:
    raise ContractTaskError(message)


async def sleep(seconds: float, marker: str | None = None) -> str:
    """Sleep, then write ``marker`` (a cancelled run must not write it)."""
    await asyncio.sleep(seconds)
    if marker:
        _write(marker, "done")
    return "slept"


def blocking_sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def pid() -> int:
    return os.getpid()


def write_marker(path: str) -> str:
    _write(path, "ran")
    return path


def burn(n: int) -> int:
    """CPU-bound work for pool-scaling checks."""
    total = 0
    for i in range(n):
        total = (total + i * i) % 1_000_003
    return total


def nested(depth: int) -> list[Any]:
    """A list nested ``depth`` deep (deeper than the stack: no pickler can encode it)."""
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


def blob(size: int) -> bytes:
    """``size`` bytes (large results)."""
    return os.urandom(16) * (size // 16) + b"x" * (size % 16)


async def record(path: str, seconds: float = 0.0, padding: str = "") -> str:
    """Sleep ``seconds``, then append a line to ``path`` (one line per execution: a test
    counts executions); ``padding`` makes the command as large as a test needs."""
    await asyncio.sleep(seconds)
    with open(path, "a") as file:  # noqa: ASYNC230 - one tiny append
        file.write("ran\n")
    return path


#: the logger :func:`chatty` and :func:`chatty_sync` log to
OUTPUT_LOGGER = "wove.testing.tasks.output"


def failing_helper(message: str) -> None:
    """The helper :func:`fail_in_helper` calls: its ``raise`` is the line a remote
    traceback must show."""
    raise ValueError(message)  # failing_helper: the failing line


def fail_in_helper(message: str) -> None:
    """Raise ``ValueError(message)`` from :func:`failing_helper` (a sync task)."""
    failing_helper(message)


class UnrebuildableError(Exception):
    """Pickles on the worker but does not unpickle on the caller (``__init__`` takes two
    arguments, ``args`` holds one), so the caller cannot rebuild it."""

    def __init__(self, left: str, right: str) -> None:
        super().__init__(f"{left} and {right}")


async def raise_unrebuildable(left: str, right: str) -> None:
    raise UnrebuildableError(left, right)


async def chatty(tag: str, lines: int = 2, delay: float = 0.0) -> str:
    """Print ``"<tag> line <i>"`` and log ``"<tag> record <i>"`` (WARNING, on
    :data:`OUTPUT_LOGGER`) ``lines`` times, sleeping ``delay`` seconds between (so
    concurrent runs interleave); returns ``tag``."""
    log = logging.getLogger(OUTPUT_LOGGER)
    for index in range(lines):
        print(f"{tag} line {index}")
        log.warning("%s record %d", tag, index)
        await asyncio.sleep(delay)
    return tag


def chatty_sync(tag: str, lines: int = 2, delay: float = 0.0) -> str:
    """:func:`chatty` as a sync task (it runs on a worker thread); prints to stderr too."""
    log = logging.getLogger(OUTPUT_LOGGER)
    for index in range(lines):
        print(f"{tag} line {index}", flush=True)
        print(f"{tag} err {index}", file=sys.stderr)
        log.warning("%s record %d", tag, index)
        time.sleep(delay)
    return tag


# -- streamed results (runtime.stream) ----------------------------------------------------
async def stream_until_released(release: str) -> Any:
    """Yield ``"first"``, then wait until the file ``release`` exists, then yield ``"second"``
    (the caller creates it only after it received the first item)."""
    yield "first"
    for _ in range(3000):  # at most ~30 s
        if Path(release).exists():
            break
        await asyncio.sleep(0.01)
    yield "second"


def count_up(n: int, counter: str, marker: str | None = None) -> Any:
    """A sync generator of ``0..n-1`` that writes how many items it produced to ``counter``
    before each yield, and writes ``marker`` in its ``finally`` (when it is closed)."""
    try:
        for index in range(n):
            _write(counter, str(index + 1))
            yield index
    finally:
        if marker:
            _write(marker, "closed")


async def acount_up(n: int, counter: str, marker: str | None = None) -> Any:
    """:func:`count_up` as an async generator."""
    try:
        for index in range(n):
            _write(counter, str(index + 1))
            yield index
            await asyncio.sleep(0)
    finally:
        if marker:
            _write(marker, "closed")


async def yield_then_fail(items: int, message: str) -> Any:
    """Yield ``0..items-1``, then raise :class:`ContractTaskError`."""
    for index in range(items):
        yield index
    raise ContractTaskError(message)
