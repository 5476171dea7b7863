"""The built-in stdio worker: ``python -m wove_executor_stdio``.

Reads one JSON command per line on stdin, runs it with :class:`wove.worker.WorkerEngine`
and writes one JSON event per line on stdout; stderr is its log. It speaks the Wove 2.x
stdio wire format, so a Wove 2.x ``StdioEnvironmentExecutor`` can use it as its
``command`` too.

Binary frames (docs/wire.md) mix with the lines at any time: a frame that starts with a
NUL byte is a binary frame that says its own length (no newline after it). The ready line
announces the ``binary_frames`` capability; once the client sent a binary frame, or said
it reads them (``WOVE_STDIO_BINARY_FRAMES=1`` in the environment), every event with bulky
data goes back as a binary frame and small ones as JSON lines (a Wove 2.x client does
neither, so it gets JSON).
A command larger than ``--max-body-bytes`` (default 256 MiB) is refused: its run gets a
``task_error`` (``CommandTooLarge``) and nothing runs.

The frame streams are protected from the tasks: at startup the real stdin and stdout are
duplicated for the frames, and file descriptors 0 and 1 are pointed at ``/dev/null`` and
stderr, so a task that calls ``print()`` (or a C library writing to fd 1) logs to stderr
instead of corrupting the event stream, and a task reading stdin reads nothing.

The first event is a ``log`` frame carrying ``"wove_stdio_ready": <pid>``; the executor
takes it as proof that the worker started. Wove 2.x clients ignore ``log`` frames.

The protocol is :class:`wove.session.WorkerService`'s, like every worker service's; this
worker is owned by one client (``exclusive``): on end of input or a ``shutdown`` command
its runs end by orphan policy and the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import signal
import stat
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from wove.errors import ProtocolError
from wove.framing import worth_binary
from wove.protocol import (
    TERMINAL_EVENTS,
    SplitFrame,
    encode_event,
    encode_event_parts,
    error_event,
    parse_json,
)
from wove.session import DEFAULT_MAX_COMMAND_BYTES, Rejected, WorkerService, WorkerSession
from wove.worker import WorkerEngine, release_large_buffers

from ._lines import (
    READ_BINARY_ENV,
    READY_KEY,
    STREAM_LIMIT,
    Frame,
    Oversized,
    Part,
    PipeReader,
    PipeWriter,
    nbytes,
    read_frame,
    write_parts,
)

__all__ = ["READY_KEY", "FrameWriter", "main", "serve"]

logger = logging.getLogger(__name__)


#: Queued bytes a :class:`FrameWriter` writes at once instead of at the end of the iteration.
FLUSH_BYTES = 256 * 1024


class FrameWriter:
    """Coalesces the frames written during one loop iteration into few writes.

    An *urgent* frame (a terminal event, a command) is written at once together with
    everything queued before it, unless a write already happened in this loop
    iteration; other frames, and urgent ones after the first, are written at the end of
    the iteration. A lone request/response therefore pays no extra loop iteration, and a
    burst costs two writes. A frame given in parts (a binary frame: its large buffers are
    views of a value's memory) keeps them apart: small neighbours are joined into one write,
    large parts are written as they are (:func:`._lines.write_parts`). Such a frame, and
    queued bytes past :data:`FLUSH_BYTES`, are written at once rather than held to the end
    of the iteration: the pipe transport copies what the pipe does not take at once, so a
    value changed after it was sent does not change the frame.

    Args:
        loop: the running loop.
        write: writes bytes (a pipe transport's ``write`` or a blocking fallback).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, write: Callable[[Part], None]) -> None:
        self._loop = loop
        self._write = write
        self._parts: list[Part] = []
        self._queued = 0
        self._scheduled = False
        self._wrote = False
        self.broken = False

    def write(self, data: bytes | Sequence[Part], *, urgent: bool = False) -> None:
        """Queue ``data`` (bytes, or a frame's parts in order); write it now when ``urgent``
        and nothing was written this iteration, or when much is queued."""
        views = False
        if isinstance(data, bytes):
            self._parts.append(data)
            self._queued += len(data)
        else:
            self._parts.extend(data)
            self._queued += sum(nbytes(part) for part in data)
            views = any(isinstance(part, memoryview) for part in data)
        if urgent and not self._wrote:
            self._wrote = True
            self._send()
        elif views or self._queued >= FLUSH_BYTES:
            self._send()
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write everything queued now (and end the iteration's urgent write)."""
        self._scheduled = False
        self._wrote = False
        self._send()

    def _send(self) -> None:
        if not self._parts:
            return
        parts, self._parts, self._queued = self._parts, [], 0
        if self.broken:
            return
        try:
            write_parts(self._write, parts)
        except (BrokenPipeError, ConnectionResetError) as exc:
            self.broken = True
            logger.warning("stdio worker: the event stream is closed (%s); events are dropped", exc)


class _OutputProtocol(asyncio.streams.FlowControlMixin):
    """Write-pipe protocol that notices when the reader goes away."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self.closed.done():
            self.closed.set_result(None)


class _OutputEvents:
    """What the :class:`._lines.PipeWriter` of the event stream reports."""

    def __init__(self) -> None:
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def pause_writing(self) -> None:
        pass  # the FrameWriter writes as events come; the pipe's reader sets the pace

    def resume_writing(self) -> None:
        pass

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if exc is not None:
            logger.warning("stdio worker: the event stream is closed (%s); events are dropped", exc)
        if not self.closed.done():
            self.closed.set_result(None)


async def _open_input(fd: int) -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=STREAM_LIMIT)
    pipe = os.fdopen(fd, "rb", buffering=0, closefd=False)
    try:
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    except ValueError:  # a regular file: no pipe transport, read it from a thread
        def pump() -> None:
            while True:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    loop.call_soon_threadsafe(reader.feed_eof)
                    return
                loop.call_soon_threadsafe(reader.feed_data, chunk)

        threading.Thread(target=pump, name="wove-stdio-stdin", daemon=True).start()
    return reader


async def _open_frames(fd: int, max_binary_bytes: int,
                       ) -> Callable[[], Awaitable[Frame | None]]:
    """Return the reader of the command frames on ``fd``: a :class:`._lines.PipeReader`
    on a pipe (binary frames are read straight into their buffers), else a stream reader."""
    try:
        return PipeReader(fd, max_binary_bytes=max_binary_bytes).next
    except (OSError, NotImplementedError, ValueError):  # a regular file, or a loop without add_reader
        reader = await _open_input(fd)
        return functools.partial(read_frame, reader, max_binary_bytes=max_binary_bytes)


def _closer(close: Callable[[], None], closed: asyncio.Future[None],
            abort: Callable[[], None]) -> Callable[[], Awaitable[None]]:
    """The close of an output pipe: close it, wait (up to 5 s) until it is, else abort."""

    async def close_output() -> None:
        close()
        try:
            await asyncio.wait_for(asyncio.shield(closed), 5.0)
        except asyncio.TimeoutError:
            abort()

    return close_output


async def _open_output(fd: int) -> tuple[Callable[[Part], None], Callable[[], Any]]:
    """Return ``(write, close)`` for the frame output fd: on a pipe, a
    :class:`._lines.PipeWriter` (what the pipe does not take at once waits as a view of
    immutable data, such as a large ``bytes`` result, instead of being copied)."""
    loop = asyncio.get_running_loop()
    if hasattr(os, "writev") and sys.platform != "win32" and stat.S_ISFIFO(os.fstat(fd).st_mode):
        events = _OutputEvents()
        writer = PipeWriter(fd, events)
        return writer.write, _closer(writer.close, events.closed, writer.abort)
    pipe = os.fdopen(fd, "wb", buffering=0, closefd=False)
    try:
        transport, protocol = await loop.connect_write_pipe(_OutputProtocol, pipe)
    except ValueError:  # a regular file: plain blocking writes
        def write_all(data: Part) -> None:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]

        async def noop() -> None:
            return None

        return write_all, noop

    return transport.write, _closer(transport.close, protocol.closed, transport.abort)


async def serve(
    *,
    input_fd: int = 0,
    output_fd: int = 1,
    max_concurrency: int = 256,
    max_threads: int | None = None,
    grace: float = 10.0,
    max_body_bytes: int = DEFAULT_MAX_COMMAND_BYTES,
) -> int:
    """Serve commands (JSON lines and binary frames) from ``input_fd`` until end of input
    or ``shutdown``.

    Args:
        input_fd: file descriptor the commands are read from.
        output_fd: file descriptor the events are written to.
        max_concurrency: runs executing at once (more wait, then reading pauses).
        max_threads: threads for sync callables.
        grace: seconds ``detach`` runs may take to finish at shutdown.
        max_body_bytes: largest command accepted, in bytes (a larger one is refused, its
            run gets a ``task_error``).

    Returns:
        The exit status (0).
    """
    loop = asyncio.get_running_loop()
    next_frame = await _open_frames(input_fd, max_body_bytes)
    write, close = await _open_output(output_fd)
    out = FrameWriter(loop, write)
    pid = os.getpid()
    engine = WorkerEngine(max_concurrency=max_concurrency, max_threads=max_threads, name=f"stdio:{pid}")
    # One client owns this worker: it obeys that client's shutdown command.
    service = WorkerService(engine, name=f"stdio:{pid}", exclusive=True, grace=grace,
                            max_command_bytes=max_body_bytes)
    # the client reads binary frames (it said so in our environment, or it sent one):
    # bulky events go as binary frames
    binary = os.environ.get(READ_BINARY_ENV) == "1"

    def emit(event: dict[str, Any]) -> None:
        urgent = event.get("type") in TERMINAL_EVENTS
        if binary and worth_binary(event):  # bulky: a binary frame; small: JSON costs less
            out.write(encode_event_parts(event), urgent=urgent)
        else:
            out.write(encode_event(event) + b"\n", urgent=urgent)

    session = service.session("stdin", emit=emit)
    session.binary = binary

    async def read_commands() -> str:
        nonlocal binary
        while not session.ended:
            frame = await next_frame()
            if frame is None:
                return "end of input"
            if isinstance(frame, Oversized):
                session.binary = binary = True
                _refuse(service, session, frame, emit)
            elif isinstance(frame, (bytearray, SplitFrame)):
                session.binary = binary = True  # before the session answers this frame
                await session.receive(frame)
            elif frame.strip():
                await session.receive(frame)
            del frame  # decoded: a large command is not held while its run executes
        return "shutdown command"

    # SIGTERM drains, as on every worker service: runs finish within the grace period,
    # the rest end with a terminal event, then the worker exits 0.
    terminated: asyncio.Future[None] = loop.create_future()

    def on_sigterm() -> None:
        if not terminated.done():
            terminated.set_result(None)

    with contextlib.suppress(NotImplementedError, RuntimeError):  # not on Windows
        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    emit({"type": "log", "message": f"wove_executor_stdio worker ready (pid {pid})", READY_KEY: pid,
          "capabilities": sorted(service.capabilities)})  # what this worker speaks beyond Wove 2.x
    reading = loop.create_task(read_commands())
    waiting: set[asyncio.Future[Any]] = {reading, terminated}
    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    if reading.done():
        logger.debug("stdio worker %d: %s; shutting down (%d active)", pid, reading.result(), engine.active)
        await service.shutdown()  # the owner is gone or said so: every run ends by its orphan policy
    else:
        logger.debug("stdio worker %d: SIGTERM; draining (%d active)", pid, engine.active)
        await service.drain()
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
    out.flush()
    await close()
    return 0


def _refuse(service: WorkerService, session: WorkerSession, frame: Oversized,
            emit: Callable[[dict[str, Any]], None]) -> None:
    """Answer a binary command over the size limit as the service answers an oversized
    JSON one: its run (named in the frame's header) gets a ``task_error``, else a ``log``."""
    try:
        service.check_size(frame.size)
        return  # not reached: the reader skips only frames over the limit
    except Rejected as exc:
        message = str(exc)
    header: Any = None
    if frame.header:
        with contextlib.suppress(ProtocolError):
            header = parse_json(frame.header)
    run_id = header.get("run_id") if isinstance(header, dict) else None
    task_id = header.get("task_id") if isinstance(header, dict) else None
    logger.warning("%s worker: refused a command from %s: %s", service.name, session.peer, message)
    if not isinstance(run_id, str) or not run_id:
        emit({"type": "log", "message": f"Worker {service.name}: {message}"})
        return
    if not isinstance(task_id, str):
        task_id = run_id.split(":")[0]
    emit(error_event(run_id, task_id, kind="CommandTooLarge", message=f"Run {run_id}: {message}",
                     source="executor"))


def _protect_streams() -> tuple[int, int]:
    """Move the frame streams off fds 0/1; return ``(input_fd, output_fd)`` for frames."""
    input_fd = os.dup(0)
    output_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)  # stray writes to fd 1 (print, C libraries, child processes) go to stderr
    sys.stdin = open(os.devnull)  # noqa: SIM115 - lives as long as the process
    sys.stdout = sys.stderr
    return input_fd, output_fd


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m wove_executor_stdio``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m wove_executor_stdio",
        description="Wove stdio worker: commands on stdin, events on stdout (JSON lines, or binary frames "
                    "with a client that sends them), log on stderr.",
    )
    parser.add_argument("--max-concurrency", type=int, default=256, help="runs executing at once (default 256)")
    parser.add_argument("--max-threads", type=int, default=None, help="threads for sync tasks (default 64)")
    parser.add_argument("--grace", type=float, default=10.0,
                        help="seconds detached runs may take to finish at shutdown (default 10)")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_COMMAND_BYTES,
                        help=f"largest command accepted, in bytes (default {DEFAULT_MAX_COMMAND_BYTES}: 256 MiB)")
    parser.add_argument("--log-level", default=os.environ.get("WOVE_LOG_LEVEL", "WARNING"),
                        help="log level on stderr (default WARNING, or $WOVE_LOG_LEVEL)")
    parser.add_argument("--adapter", default="stdio", help=argparse.SUPPRESS)  # Wove 2.x flag; ignored
    args = parser.parse_args(argv)
    release_large_buffers()
    if args.max_concurrency < 1:
        parser.error(f"--max-concurrency must be at least 1, got {args.max_concurrency}")
    if args.max_body_bytes < 1:
        parser.error(f"--max-body-bytes must be at least 1, got {args.max_body_bytes}")
    logging.basicConfig(
        stream=sys.stderr,
        level=str(args.log_level).upper(),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )
    if not os.isatty(0):
        # The parent owns our lifetime (we exit at end of input); a terminal's Ctrl-C
        # reaching the whole process group must not print tracebacks from every worker.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    input_fd, output_fd = _protect_streams()
    return asyncio.run(serve(
        input_fd=input_fd,
        output_fd=output_fd,
        max_concurrency=args.max_concurrency,
        max_threads=args.max_threads,
        grace=args.grace,
        max_body_bytes=args.max_body_bytes,
    ))
