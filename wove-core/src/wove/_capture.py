"""A task's ``print()`` and ``logging`` output, captured per run and shown to the caller.

Worker side: :func:`activate` makes a :class:`RunCapture` the current run's capture (a
context variable, so concurrent runs on one loop, and sync runs on threads that run in a
copy of the context, each write to their own). The first activation installs, once per
process, a proxy for ``sys.stdout`` and ``sys.stderr`` that routes a write to the current
run's capture and every other write to the stream it replaced, and a handler on the root
logger that forwards the current run's records. The capture turns what it collected into
``log`` events (``stream`` text in whole lines, or a ``record``) on the worker's loop.

Caller side: :func:`show_output` prints a ``log`` event's ``stream`` lines on
``sys.stderr`` and hands its ``record`` to the caller's logger of the same name, both
tagged with the task, the environment and the worker's pid (the way Ray prefixes
``(task pid=…)``).

Writes that do not go through ``sys.stdout``/``sys.stderr`` (``os.write(1, …)``, C
libraries, child processes) are not captured; threads a task starts itself do not run in
its context, so their output goes to the worker's own streams.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import threading
from collections.abc import Callable, Iterable
from contextvars import ContextVar, Token
from typing import Any

__all__ = ["HOST", "RunCapture", "activate", "deactivate", "show_output"]

#: this machine's name, sent with captured output and errors
HOST = socket.gethostname()

#: a partial line longer than this is sent without waiting for its end
MAX_PARTIAL_LINE = 8192

_current: ContextVar[RunCapture | None] = ContextVar("wove_run_capture", default=None)


class RunCapture:
    """The output of one run, emitted as ``log`` events on the worker's loop.

    Args:
        loop: the worker's loop (writes from other threads are handed to it).
        emit: called on the loop with the fields of each ``log`` event (``stream`` and
            ``message``, or ``record`` and ``message``, plus ``pid`` and ``host``).
    """

    __slots__ = ("_emit", "_lock", "_loop", "_parts", "_scheduled", "_tails", "_thread", "closed")

    def __init__(self, loop: asyncio.AbstractEventLoop, emit: Callable[[dict[str, Any]], None]) -> None:
        self._loop = loop
        self._thread = threading.get_ident()
        self._emit = emit
        self._lock = threading.Lock()
        self._parts: list[tuple[str, Any]] = []
        self._tails: dict[str, str] = {}
        self._scheduled = False
        #: True after the final flush: later writes (an abandoned thread) go to the real stream
        self.closed = False

    def write(self, stream: str, text: str) -> None:
        """Keep ``text`` written to ``stream`` (``stdout`` or ``stderr``)."""
        self._add((stream, text))

    def record(self, fields: dict[str, Any]) -> None:
        """Keep a log record's fields."""
        self._add(("record", fields))

    def _add(self, part: tuple[str, Any]) -> None:
        with self._lock:
            self._parts.append(part)
            if self._scheduled:
                return
            self._scheduled = True
        if threading.get_ident() == self._thread:
            self._loop.call_soon(self.flush)
        else:
            try:
                self._loop.call_soon_threadsafe(self.flush)
            except RuntimeError:  # the loop is closed: the worker is going away
                pass

    def flush(self, final: bool = False) -> None:
        """Emit what was collected: whole lines of text (all of it when ``final``) and records."""
        with self._lock:
            parts, self._parts = self._parts, []
            self._scheduled = False
            if final:
                self.closed = True
        if not parts and not (final and self._tails):
            return
        pid = os.getpid()
        tails = self._tails
        for stream, value in _merged(parts):
            if stream == "record":
                self._emit({"record": value, "message": f"{value['levelname']} {value['name']}: {value['msg']}",
                            "pid": pid, "host": HOST})
                continue
            text = tails.pop(stream, "") + value
            cut = text.rfind("\n") + 1
            if cut < len(text) and len(text) - cut < MAX_PARTIAL_LINE:
                tails[stream] = text[cut:]
                text = text[:cut]
            if text:
                self._emit({"stream": stream, "message": text, "pid": pid, "host": HOST})
        if final:
            for stream, text in list(tails.items()):
                self._emit({"stream": stream, "message": text, "pid": pid, "host": HOST})
            tails.clear()


def _merged(parts: list[tuple[str, Any]]) -> Iterable[tuple[str, Any]]:
    """Consecutive writes to one stream as one text; records as they are."""
    stream: str | None = None
    chunks: list[str] = []
    for kind, value in parts:
        if kind == "record":
            if chunks:
                yield stream or "stdout", "".join(chunks)
                chunks, stream = [], None
            yield kind, value
        elif kind == stream:
            chunks.append(value)
        else:
            if chunks:
                yield stream or "stdout", "".join(chunks)
            stream, chunks = kind, [value]
    if chunks:
        yield stream or "stdout", "".join(chunks)


class _StreamProxy:
    """Stands in for ``sys.stdout``/``sys.stderr``: a write goes to the current run's
    capture when one is active, else to the stream it replaced."""

    def __init__(self, name: str, target: Any) -> None:
        self._wove_name = name
        self._wove_target = target

    def write(self, text: str) -> int:
        capture = _current.get()
        if capture is None or capture.closed:
            return self._wove_target.write(text)  # type: ignore[no-any-return]
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if text:
            capture.write(self._wove_name, text)
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        capture = _current.get()
        if capture is None or capture.closed:
            self._wove_target.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wove_target, name)

    def __repr__(self) -> str:
        return f"<wove capture of {self._wove_name}: {self._wove_target!r}>"


class _ForwardHandler(logging.Handler):
    """On the root logger: forwards the records logged during a captured run."""

    _formatter = logging.Formatter()

    def handle(self, record: logging.LogRecord) -> bool:  # type: ignore[override]
        capture = _current.get()
        if capture is None or capture.closed:
            _last_resort(record)
            return False
        try:
            message = record.getMessage()
        except Exception as exc:  # a bad format string is the task's problem; say so
            message = f"{record.msg!r} (could not be formatted with its arguments: {exc})"
        fields: dict[str, Any] = {"name": record.name, "levelno": record.levelno,
                                  "levelname": record.levelname, "msg": message}
        if record.exc_info:
            fields["exc_text"] = self._formatter.formatException(record.exc_info)
        elif record.exc_text:
            fields["exc_text"] = record.exc_text
        if record.stack_info:
            fields["stack_info"] = record.stack_info
        capture.record(fields)
        return True

    def emit(self, record: logging.LogRecord) -> None:  # pragma: no cover - handle() does the work
        self.handle(record)


def _last_resort(record: logging.LogRecord) -> None:
    """What logging does when no handler is found, which this handler's presence on the
    root logger would otherwise prevent (a process without logging configured still
    shows its warnings on stderr)."""
    last = logging.lastResort
    if last is None or record.levelno < last.level:
        return
    logger: logging.Logger | None = logging.getLogger(record.name) if record.name != "root" else logging.getLogger()
    while logger is not None:
        if any(handler is not _HANDLER for handler in logger.handlers):
            return
        logger = logger.parent if logger.propagate else None
    last.handle(record)


_HANDLER = _ForwardHandler()
_install_lock = threading.Lock()


def _install() -> None:
    """Put the proxies and the handler in place (again, if something replaced them)."""
    with _install_lock:
        for name in ("stdout", "stderr"):
            stream = getattr(sys, name)
            if stream is not None and not isinstance(stream, _StreamProxy):
                setattr(sys, name, _StreamProxy(name, stream))
        root = logging.getLogger()
        if _HANDLER not in root.handlers:
            root.addHandler(_HANDLER)


def activate(capture: RunCapture) -> Token[RunCapture | None]:
    """Make ``capture`` the current context's capture; returns the token for :func:`deactivate`."""
    if not isinstance(sys.stdout, _StreamProxy) or not isinstance(sys.stderr, _StreamProxy) \
            or _HANDLER not in logging.getLogger().handlers:
        _install()
    return _current.set(capture)


def deactivate(token: Token[RunCapture | None]) -> None:
    _current.reset(token)


# -- caller side ---------------------------------------------------------------------
def _tag(environment: str, event: dict[str, Any]) -> str:
    tag = f"{event.get('task_id')} env={environment}"
    pid = event.get("pid")
    if pid is not None:
        tag += f" pid={pid}"
    host = event.get("host")
    if host and host != HOST:
        tag += f" host={host}"
    return tag


def show_output(environment: str, event: dict[str, Any]) -> bool:
    """Show a ``log`` event carrying a run's output; False when it carries none.

    ``stream`` text goes to ``sys.stderr``, a line at a time, each line prefixed with
    ``(<task> env=<environment> pid=<pid>)``; a ``record`` goes to the caller's logger
    of the same name (when it is enabled for the record's level) with the same prefix on
    its message and the attributes ``wove_environment``, ``wove_task``, ``wove_run_id``,
    ``wove_pid`` and ``wove_host``.
    """
    stream, record = event.get("stream"), event.get("record")
    if isinstance(stream, str):
        text = event.get("message")
        if not isinstance(text, str) or not text:
            return True
        prefix = f"({_tag(environment, event)}) "
        lines = text.splitlines()
        out = sys.stderr
        if out is not None:
            out.write("".join(f"{prefix}{line}\n" for line in lines))
            out.flush()
        return True
    if isinstance(record, dict):
        _log_record(environment, event, record)
        return True
    return False


def _log_record(environment: str, event: dict[str, Any], fields: dict[str, Any]) -> None:
    name = fields.get("name")
    name = name if isinstance(name, str) and name and name != "root" else None
    target = logging.getLogger(name)
    levelno = fields.get("levelno")
    if not isinstance(levelno, int) or isinstance(levelno, bool):
        levelno = logging.getLevelName(str(fields.get("levelname", "INFO")))
        levelno = levelno if isinstance(levelno, int) else logging.INFO
    if not target.isEnabledFor(levelno):
        return
    extra = {
        "wove_environment": environment,
        "wove_task": event.get("task_id"),
        "wove_run_id": event.get("run_id"),
        "wove_pid": event.get("pid"),
        "wove_host": event.get("host"),
    }
    record = target.makeRecord(target.name, levelno, f"<{environment}:{event.get('task_id')}>", 0,
                               f"({_tag(environment, event)}) {fields.get('msg', '')}", (), None, extra=extra)
    exc_text = fields.get("exc_text")
    if isinstance(exc_text, str) and exc_text:
        record.exc_text = exc_text
    stack_info = fields.get("stack_info")
    if isinstance(stack_info, str) and stack_info:
        record.stack_info = stack_info
    target.handle(record)
