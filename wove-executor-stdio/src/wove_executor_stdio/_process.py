"""One worker subprocess of the stdio executor: its pipes, split into frames (stdout) and
lines (stderr) as data arrives."""

from __future__ import annotations

import asyncio

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Sequence

from wove.protocol import SplitFrame

from ._lines import Frame, FrameReader, FrameSplitter, Oversized, Part, PipeWriter, read_available
from .worker import FLUSH_BYTES, FrameWriter

__all__ = ["FLUSH_BYTES", "STDERR_LINES", "Pipes", "Worker"]

logger = logging.getLogger("wove_executor_stdio.executor")

#: stderr lines kept per worker for error messages.
STDERR_LINES = 20
#: stderr bytes without a newline passed on as one line.
STDERR_LINE_LIMIT = 64 * 1024


class Pipes(asyncio.SubprocessProtocol):
    """Splits the worker's stdout into frames (JSON lines and binary frames, see
    :mod:`._lines`) and its stderr into lines as data arrives (no reader tasks).

    Where the loop can watch a pipe (:meth:`read_stdout`), the executor gives the worker a
    stdout pipe of its own, read with ``os.readv`` straight into a :class:`._lines.FrameReader`'s
    buffers: a binary frame's body lands in one buffer of its size, reused for later frames
    up to 8 MiB, or a larger one's in one buffer per segment (a SplitFrame). Otherwise
    stdout is the subprocess transport's pipe, split by a :class:`~wove.framing.FrameSplitter`.

    Args:
        on_stdout: called with each frame (a JSON line as bytes, a binary frame as a
            bytearray, or a :class:`~wove.protocol.SplitFrame` when it is large or came from
            the subprocess pipe in pieces).
        on_stderr: called with each stderr line.
        on_bad_stdout: called with a description of stdout bytes that are not a frame.
    """

    def __init__(self, on_stdout: Callable[[bytes | bytearray | SplitFrame], None], on_stderr: Callable[[bytes], None],
                 on_bad_stdout: Callable[[str], None]) -> None:
        loop = asyncio.get_running_loop()
        self._handlers: dict[int, Callable[[bytes], None]] = {2: on_stderr}
        self._loop = loop
        self._on_stdout = self._guarded(on_stdout)
        self._on_bad_stdout = on_bad_stdout
        self._frames = FrameSplitter(self._on_stdout, on_bad_stdout, by_segment=True)
        self._reader: FrameReader | None = None
        self._stdout_fd: int | None = None
        #: the worker's stdin when it is a pipe of the executor's own
        self.stdin_writer: PipeWriter | None = None
        self._partial: dict[int, bytearray] = {2: bytearray()}
        self.closed = {1: loop.create_future(), 2: loop.create_future()}
        self.exited = loop.create_future()
        self.writable = asyncio.Event()
        self.writable.set()

    @staticmethod
    def _guarded(handler: Callable[[bytes | bytearray | SplitFrame], None]
                 ) -> Callable[[bytes | bytearray | SplitFrame], None]:
        def guarded(frame: bytes | bytearray | SplitFrame) -> None:
            try:
                handler(frame)
            except Exception:
                logger.exception("stdio executor: handling a frame of the worker's stdout failed")

        return guarded

    def read_stdout(self, fd: int) -> None:
        """Read the worker's stdout from ``fd`` (the read end of a pipe this object now owns)
        with ``loop.add_reader`` and ``os.readv``.

        Raises:
            OSError, NotImplementedError, ValueError: the loop cannot watch ``fd``.
        """
        os.set_blocking(fd, False)
        self._loop.add_reader(fd, self._stdout_ready)
        self._stdout_fd = fd
        self._reader = FrameReader(self._direct_frame)

    def _direct_frame(self, frame: Frame) -> None:
        if not isinstance(frame, Oversized):  # no size limit is set: never one
            self._on_stdout(frame)

    def _stdout_ready(self) -> None:
        reader, fd = self._reader, self._stdout_fd
        if reader is None or fd is None:
            return
        count = read_available(reader, fd, "a worker's stdout")
        if count is None or count:
            return
        if not reader.close():
            self._on_bad_stdout("the stream ended inside a binary frame")
        self.close()

    def close(self) -> None:
        """Stop reading a stdout pipe of our own and close it (stdout counts as closed); close
        a stdin pipe of our own without writing what is queued."""
        if self.stdin_writer is not None:
            self.stdin_writer.abort()
        fd, self._stdout_fd = self._stdout_fd, None
        if fd is None:
            return
        self._reader = None
        self._loop.remove_reader(fd)
        os.close(fd)
        self.pipe_connection_lost(1, None)

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd == 1:
            self._frames.feed(data)
            return
        handler = self._handlers.get(fd)
        if handler is None:
            return
        partial = self._partial[fd]
        end = data.rfind(b"\n")
        if end < 0:
            partial += data  # a long line arrives in pieces; search only the new bytes
            if fd == 2 and len(partial) > STDERR_LINE_LIMIT:
                self._partial[fd] = bytearray()
                handler(bytes(partial))
            return
        if partial:
            partial += data[:end]
            lines = bytes(partial).split(b"\n")
            partial.clear()
        else:
            lines = data[:end].split(b"\n")
        partial += data[end + 1:]
        for line in lines:
            try:
                handler(line)
            except Exception:
                logger.exception("stdio executor: handling a line of fd %d failed", fd)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if fd == 0:
            self.writable.set()
            return
        if fd == 1:
            self._frames.close()
        partial = self._partial.get(fd)
        if partial:
            line = bytes(partial)
            partial.clear()
            with contextlib.suppress(Exception):
                self._handlers[fd](line)
        future = self.closed.get(fd)
        if future is not None and not future.done():
            future.set_result(None)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()


#: Pipe capacity asked for (Linux ``F_SETPIPE_SZ``; the default is 64 KiB): a 1 MiB frame
#: then crosses in a few writes and loop wake-ups instead of sixteen.
PIPE_BYTES = 1 << 20


def grow_pipe(pipe_transport: asyncio.BaseTransport | int | None) -> None:
    """Ask for :data:`PIPE_BYTES` of capacity on a worker pipe (its transport or file
    descriptor) where the system allows it (Linux; an unprivileged process gets at most
    ``/proc/sys/fs/pipe-max-size``, 1 MiB by default); elsewhere, or when refused, the pipe
    keeps its size."""
    setting = getattr(fcntl, "F_SETPIPE_SZ", None) if fcntl is not None else None
    if isinstance(pipe_transport, int):
        fd: int | None = pipe_transport
    else:
        pipe = pipe_transport.get_extra_info("pipe") if pipe_transport is not None else None
        fd = pipe.fileno() if pipe is not None else None
    if setting is None or fd is None:
        return
    try:
        fcntl.fcntl(fd, setting, PIPE_BYTES)
    except (OSError, ValueError):
        pass


class Worker:
    """One worker subprocess and what the executor knows about it."""

    def __init__(self, worker_id: int, transport: asyncio.SubprocessTransport, pipes: Pipes) -> None:
        self.id = worker_id
        self.transport = transport
        self.pipes = pipes
        self.pid: int = transport.get_pid()
        self.runs: set[str] = set()
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_LINES)
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.alive = True
        self.started = False  # part of the pool (its death is handled, not a start failure)
        self.started_at = time.monotonic()
        self.watcher: asyncio.Task[None] | None = None
        #: send binary frames (the worker announced ``binary_frames`` and the config allows it)
        self.binary = False
        stdin: asyncio.BaseTransport | PipeWriter | None = pipes.stdin_writer or transport.get_pipe_transport(0)
        assert isinstance(stdin, (asyncio.WriteTransport, PipeWriter))
        self.stdin = stdin
        for fd in (0, 1):
            grow_pipe(transport.get_pipe_transport(fd))
        self.out = FrameWriter(asyncio.get_running_loop(), self._write)

    @property
    def returncode(self) -> int | None:
        return self.transport.get_returncode()

    def _write(self, data: Part) -> None:
        if not self.stdin.is_closing():
            self.stdin.write(data)

    def write(self, data: bytes | Sequence[Part]) -> None:
        """Send one frame: its bytes, or its parts in order (a binary frame whose large
        parts are views of the caller's data; they are not joined). Queued bytes past
        :data:`FLUSH_BYTES` are written at once."""
        self.out.write(data, urgent=True)

    def close(self) -> None:
        """Close the process's transport and the stdout pipe read directly."""
        self.transport.close()
        self.pipes.close()

    def signal(self, kill: bool) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.transport.kill() if kill else self.transport.terminate()

    async def wait(self, timeout: float) -> bool:
        """Wait (bounded) for the process to exit; True when it has."""
        if self.returncode is None:
            await asyncio.wait([self.pipes.exited], timeout=timeout)
        return self.returncode is not None

    def tail_text(self) -> str:
        if not self.stderr_tail:
            return " It wrote nothing to stderr."
        return " Last stderr lines:\n" + "\n".join(f"    {line}" for line in self.stderr_tail)
