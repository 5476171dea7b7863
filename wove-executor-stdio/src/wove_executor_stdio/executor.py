"""StdioEnvironmentExecutor: runs tasks in a pool of worker subprocesses over JSON lines.

Each worker reads one command frame per line on stdin and writes one event frame per
line on stdout (the Wove 2.x stdio wire format); its stderr is its log. With a worker
whose ready line announced ``binary_frames`` (and ``executor_config.binary_frames``
true, the default), ``run_task`` commands with bulky data go as binary frames instead
(:func:`wove.framing.worth_binary`; docs/wire.md: self-delimiting, starting with a NUL
byte; their large buffers are written without copies into a joined message), and the
worker answers bulky events in binary frames; both kinds of frame are read at any time. ``run_task``
goes to the least-loaded live worker, ``cancel_task`` to the worker holding the run.
When a worker dies, a replacement is started and each run it held is delivered again
(orphan policy ``requeue``, bounded by ``max_deliveries``) or ends with a ``task_error``
(source ``transport``) naming the worker, its pid, exit code or signal and its last
stderr lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from wove.dispatch import require_dispatch
from wove.errors import ProtocolError
from wove.framing import worth_binary
from wove.options import (
    BOOL,
    INVALID,
    PAYLOAD_OPTIONS,
    POSITIVE_INT,
    POSITIVE_SECONDS,
    REDELIVERY_OPTIONS,
    STR_MAP,
    Kind,
    Option,
    OptionSpec,
    path_of_directory,
)
from wove.protocol import (
    CAPABILITY_BINARY_FRAMES,
    TERMINAL_EVENTS,
    SplitFrame,
    decode_events,
    encode_binary_parts,
    encode_frame,
)
from wove.transport import FrameExecutor, PayloadPolicy

from ._lines import BINARY_START, READ_BINARY_ENV, READY_KEY, Part, nbytes
from ._process import Pipes, PipeWriter, Worker, grow_pipe

__all__ = ["STDIO_OPTIONS", "StdioEnvironmentExecutor"]

logger = logging.getLogger(__name__)

#: Seconds a worker that prints no ready line must stay alive to count as started.
STARTUP_GRACE = 0.5
#: Seconds workers get to exit after ``shutdown`` before they are terminated.
SHUTDOWN_GRACE = 2.0
#: Pipe buffer size above which ``send`` waits for the worker to read.
HIGH_WATER = 4 * 1024 * 1024
#: Read the workers' stdout from pipes of our own with ``os.readv`` (:meth:`Pipes.read_stdout`)
#: where the platform has it; elsewhere through the subprocess transport.
_DIRECT_STDOUT = hasattr(os, "readv") and sys.platform != "win32"
#: Workers dying this soon after they started count as a crash loop.
RAPID_DEATH_SECONDS = 2.0
#: Consecutive rapid deaths after which dead workers are replaced on demand only.
RAPID_DEATH_LIMIT = 5


def _default_command() -> list[str]:
    return [sys.executable, "-m", "wove_executor_stdio"]


def _command(value: Any) -> Any:
    """A worker command: a list of strings (or paths), or a string split like a shell."""
    if value == "" or value == []:
        return []  # the default command
    if isinstance(value, str):
        try:
            command = shlex.split(value)
        except ValueError as exc:
            raise ValueError(f"it cannot be split like a shell command line: {exc}") from None
        if not command:
            raise ValueError("it is blank; give the worker program and its arguments")
        return command
    if isinstance(value, (list, tuple)):
        bad = [part for part in value if not isinstance(part, (str, os.PathLike))]
        if bad:
            raise ValueError(f"item {bad[0]!r} is a {type(bad[0]).__name__}")
        return [os.fspath(part) for part in value]
    return INVALID


#: The stdio executor's ``executor_config`` keys (see :mod:`wove.options`).
STDIO_OPTIONS = OptionSpec("stdio", [
    Option("command", Kind("a list of strings or a command string", _command),
           doc="the worker command (default: this Python, -m wove_executor_stdio)"),
    Option("processes", POSITIVE_INT, 1, "worker processes in the pool"),
    Option("env", STR_MAP, doc="environment variables set over os.environ"),
    Option("cwd", path_of_directory(), doc="working directory of the workers"),
    Option("startup_timeout", POSITIVE_SECONDS, 30.0, "seconds a worker may take to report ready"),
    Option("ready_line", BOOL, doc="the worker prints a ready line first (default: when it runs wove_executor_stdio)"),
    REDELIVERY_OPTIONS,
    PAYLOAD_OPTIONS,
])


class StdioEnvironmentExecutor(FrameExecutor):
    """Runs tasks in worker subprocesses speaking JSON lines on stdin/stdout.

    ``executor_config`` keys:

    * ``command`` (list of strings, or a string split like a shell): the worker
      command; default ``[sys.executable, "-m", "wove_executor_stdio"]``. Any Wove 2.x
      compatible worker works, such as ``python -m wove.stdio_worker``.
    * ``processes`` (int, default 1): worker processes in the pool.
    * ``env`` (dict of str): environment variables set over ``os.environ``.
    * ``cwd`` (str): working directory of the workers.
    * ``startup_timeout`` (seconds, default 30): how long a worker may take to report
      ready.
    * ``ready_line`` (bool): whether the worker prints a ready line first (default:
      true when the command runs ``wove_executor_stdio``). Without one, a worker
      that is still alive after 0.5 s counts as started.
    * ``max_deliveries`` (int, default 3): deliveries of a ``requeue`` run, and the other
      re-delivery keys of :data:`wove.options.REDELIVERY_OPTIONS`.
    * ``binary_frames`` (bool, default true): send ``run_task`` as binary frames to a
      worker that announced ``binary_frames`` in its ready line (false: JSON lines only).
    * ``max_message_bytes`` (int, default 256 MiB, the worker's ``--max-body-bytes``): a
      larger ``run_task`` fails with :class:`~wove.errors.PayloadTooLargeError` before it
      is sent.
    * ``payload_warning_bytes`` (int or false, default 16 MiB): a command or result
      larger than this logs a warning naming the task and the size.

    Any other key is a :class:`~wove.errors.ConfigError` at start, with a did-you-mean.
    """

    executor_name = "stdio"
    config_options = STDIO_OPTIONS

    def __init__(self) -> None:
        super().__init__()
        self._command: list[str] = []
        self._processes = 1
        self._env: dict[str, str] | None = None
        self._cwd: str | None = None
        self._startup_timeout = 30.0
        self._ready_line = True
        self._binary_frames = True
        self._workers: list[Worker] = []
        self._worker_capabilities: dict[int, frozenset[str]] = {}
        self._owner: dict[str, Worker] = {}
        self._spawning: set[asyncio.Task[Worker]] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self._next_id = 0
        self._rapid_deaths = 0
        self._closing = False
        self._options: dict[str, Any] = {}

    # -- configuration ---------------------------------------------------------
    def _configure(self, environment_name: str, config: dict[str, Any]) -> None:
        options = STDIO_OPTIONS.validate(config, environment=environment_name)
        self._command = options["command"] or _default_command()
        self._processes = options["processes"]
        self._env = {**os.environ, **options["env"]} if options["env"] is not None else None
        self._cwd = options["cwd"]
        self._startup_timeout = float(options["startup_timeout"])
        ready_line = options["ready_line"]
        if ready_line is None:
            ready_line = any("wove_executor_stdio" in part for part in self._command)
        self._ready_line = ready_line
        self._binary_frames = options["binary_frames"]
        if self._binary_frames:  # our worker answers bulky events in binary frames from the start
            self._env = {**(self._env if self._env is not None else os.environ), READ_BINARY_ENV: "1"}
        self._options = options

    # -- lifecycle -------------------------------------------------------------
    async def start(
        self,
        *,
        environment_name: str,
        environment_config: dict[str, Any],
        run_config: dict[str, Any],
    ) -> None:
        """Start the worker pool.

        Raises:
            ConfigError: an unknown ``executor_config`` key (with a did-you-mean) or an
                invalid value (the key, the value and what is expected).
            MissingDispatchFeatureError: cloudpickle is not installed.
            FileNotFoundError: the worker command does not exist.
            RuntimeError: a worker exited during startup (exit code, last stderr lines)
                or did not report ready within ``startup_timeout``.
        """
        self._configure(environment_name, environment_config)
        self._open_events(environment_name, environment_config)
        self._payload = PayloadPolicy.from_config(self._options)
        require_dispatch("the stdio executor sends task callables and arguments to worker processes.")
        self._closing = False
        spawns = [asyncio.ensure_future(self._spawn()) for _ in range(self._processes)]
        done, _ = await asyncio.wait(spawns, return_when=asyncio.FIRST_EXCEPTION)
        failure = next((task.exception() for task in done if task.exception() is not None), None)
        if failure is not None:
            for task in spawns:
                task.cancel()
            results = await asyncio.gather(*spawns, return_exceptions=True)
            for result in results:
                if isinstance(result, Worker):
                    await self._kill(result)
            self._events = None
            raise failure
        for task in spawns:
            self._enlist(task.result())
        logger.debug("stdio executor for %s started %d worker(s): %s", environment_name, len(self._workers),
                     ", ".join(str(w.pid) for w in self._workers))

    async def stop(self) -> None:
        """Shut every worker down (``shutdown``, then terminate, then kill); never hangs."""
        self._closing = True
        for task in list(self._spawning):
            task.cancel()
        if self._spawning:
            await asyncio.gather(*self._spawning, return_exceptions=True)
        workers = list(self._workers)
        shutdown = encode_frame({"type": "shutdown"}) + b"\n"
        for worker in workers:
            if worker.alive:
                worker.write(shutdown)
                worker.out.flush()
            with contextlib.suppress(Exception):
                worker.stdin.close()
        exits = [w.pipes.exited for w in workers if w.returncode is None]
        if exits:
            await asyncio.wait(exits, timeout=SHUTDOWN_GRACE)
        for worker in workers:
            if worker.returncode is None:
                logger.warning("stdio worker %d (pid %d) did not exit within %gs of shutdown; terminating it",
                               worker.id, worker.pid, SHUTDOWN_GRACE)
                worker.signal(kill=False)
        for worker in workers:
            if not await worker.wait(1.0):
                await self._kill(worker)
        watchers: list[asyncio.Task[Any]] = [w.watcher for w in workers if w.watcher is not None]
        watchers += list(self._background)
        if watchers:
            _done, pending = await asyncio.wait(watchers, timeout=2.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
        for worker in workers:
            worker.close()
        self._workers.clear()
        self._owner.clear()
        self._background.clear()

    # -- sending ---------------------------------------------------------------
    async def send(self, frame: dict[str, Any]) -> None:
        """Send a command frame to the pool.

        Raises:
            DispatchError: the run's callable or arguments cannot be pickled (the run is
                not sent; the executor stays usable).
            PayloadTooLargeError: the encoded ``run_task`` is larger than
                ``executor_config.max_message_bytes`` (nothing is sent).
            ValueError: an unknown frame type.
            RuntimeError: the executor is not started or is shutting down, or no worker
                could be started.
        """
        self._require_started()
        frame_type = frame.get("type")
        if frame_type == "run_task":
            if self._closing:
                raise RuntimeError(
                    f"stdio executor for environment '{self._environment}' is shutting down; "
                    f"run {frame.get('run_id')} was not sent."
                )
            worker = await self._pick()
            data, size = self._encode(worker, frame)
            self._check_payload(frame, size)
            self._assign(worker, frame, data, size)
            await self._backpressure(worker)
        elif frame_type == "stream_credit":  # only sent when every worker announced task_yield
            owner = self._owner.get(str(frame.get("run_id")))
            if owner is not None and owner.alive:
                owner.write(encode_frame(frame) + b"\n")
        elif frame_type == "cancel_task":
            run_id = str(frame.get("run_id"))
            owner = self._owner.get(run_id)
            if owner is not None and owner.alive:
                owner.write(encode_frame(frame) + b"\n")
            elif run_id in self._inflight:
                # lost with its worker and waiting for re-delivery: it never runs again
                self._emit({"type": "task_cancelled", "run_id": run_id, "task_id": frame.get("task_id")})
        elif frame_type == "shutdown":
            self._closing = True
            data = encode_frame(frame) + b"\n"
            for worker in self._workers:
                if worker.alive:
                    worker.write(data)
        else:
            raise ValueError(
                f"stdio executor for environment '{self._environment}' cannot send frame type "
                f"{frame_type!r}; expected run_task, cancel_task or shutdown."
            )

    @staticmethod
    def _encode(worker: Worker, frame: dict[str, Any]) -> tuple[bytes | Sequence[Part], int]:
        """A run_task for ``worker``: a binary frame's parts when it speaks them, else a
        JSON line; and its size in bytes."""
        if worker.binary and worth_binary(frame):  # bulky: a binary frame; small: JSON costs less
            parts = encode_binary_parts(frame)
            return parts, sum(nbytes(part) for part in parts)
        data = encode_frame(frame) + b"\n"
        return data, len(data)

    def _assign(self, worker: Worker, frame: dict[str, Any], data: bytes | Sequence[Part], size: int) -> None:
        run_id = frame["run_id"]
        self._track(frame, size)
        worker.runs.add(run_id)
        self._owner[run_id] = worker
        worker.write(data)

    async def _backpressure(self, worker: Worker) -> None:
        if worker.stdin.get_write_buffer_size() <= HIGH_WATER or worker.pipes.writable.is_set():
            return
        # bounded: a worker that stops reading for this long is dead or stuck, not slow
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(worker.pipes.writable.wait(), 60.0)

    async def _pick(self) -> Worker:
        """The least-loaded live worker, starting a replacement when none is alive."""
        for _attempt in range(3):
            live = [w for w in self._workers if w.alive]
            if live:
                return min(live, key=lambda w: len(w.runs))
            self._replenish()
            spawning = list(self._spawning)
            done, _ = await asyncio.wait(spawning, timeout=self._startup_timeout + 5.0,
                                         return_when=asyncio.FIRST_COMPLETED)
            live = [w for w in self._workers if w.alive]
            if live:
                return min(live, key=lambda w: len(w.runs))
            errors = [t.exception() for t in done if not t.cancelled() and t.exception() is not None]
            if errors:
                raise RuntimeError(
                    f"stdio executor for environment '{self._environment}' has no running worker "
                    f"and could not start one: {errors[0]}"
                ) from errors[0]
            if self._closing:
                break
        raise RuntimeError(
            f"stdio executor for environment '{self._environment}' has no running worker "
            f"(command {shlex.join(self._command)})."
        )

    # -- worker processes ------------------------------------------------------
    def _replenish(self) -> None:
        """Start workers in the background until the pool is full again."""
        if self._closing:
            return
        missing = self._processes - sum(1 for w in self._workers if w.alive) - len(self._spawning)
        for _ in range(missing):
            task = asyncio.ensure_future(self._spawn())
            self._spawning.add(task)
            task.add_done_callback(self._spawned)

    def _spawned(self, task: asyncio.Task[Worker]) -> None:
        self._spawning.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            logger.error("stdio executor for environment '%s' could not start a replacement worker: %s",
                         self._environment, exc)
            return
        worker = task.result()
        if self._closing:
            self._background_task(self._kill(worker))
        else:
            self._enlist(worker)

    def _enlist(self, worker: Worker) -> None:
        worker.started = True
        worker.started_at = time.monotonic()
        self._workers.append(worker)
        if not worker.alive:  # died between its ready line and now
            self._background_task(self._worker_died(worker))

    def _background_task(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _spawn(self) -> Worker:
        """Start one worker and wait until it is ready (see the class docstring)."""
        self._next_id += 1
        worker_id = self._next_id
        shown = shlex.join(self._command)
        loop = asyncio.get_running_loop()
        holder: list[Worker] = []
        pipes = Pipes(lambda frame: self._handle_frame(holder[0], frame),
                       lambda line: self._stderr_line(holder[0], line),
                       lambda problem: self._bad_output(holder[0], problem))
        stdout: int = subprocess.PIPE
        stdin: int = subprocess.PIPE
        direct: int | None = None  # the read end of a stdout pipe read straight into frame buffers
        if _DIRECT_STDOUT:
            direct, stdout = os.pipe()
            grow_pipe(direct)
            try:
                pipes.read_stdout(direct)
            except (OSError, NotImplementedError, ValueError):  # a loop that cannot watch pipes
                os.close(direct)
                os.close(stdout)
                direct, stdout = None, subprocess.PIPE
            else:
                stdin, to_worker = os.pipe()
                grow_pipe(to_worker)
                pipes.stdin_writer = PipeWriter(to_worker, pipes)
        try:
            transport, _ = await loop.subprocess_exec(
                lambda: pipes,
                *self._command,
                stdin=stdin,
                stdout=stdout,
                stderr=subprocess.PIPE,
                env=self._env,
                cwd=self._cwd,
            )
        except FileNotFoundError as exc:
            pipes.close()
            raise FileNotFoundError(
                f"Environment '{self._environment}': cannot start the stdio worker: the program "
                f"{self._command[0]!r} of executor_config.command ({shown}) was not found. Give an "
                f"installed program or its full path; the default is "
                f"[sys.executable, '-m', 'wove_executor_stdio']."
            ) from exc
        except OSError as exc:
            pipes.close()
            raise type(exc)(
                f"Environment '{self._environment}': cannot start the stdio worker ({shown}): "
                f"{exc.strerror or exc}. Check executor_config.command and executor_config.cwd."
            ) from exc
        except BaseException:
            pipes.close()
            raise
        finally:
            if direct is not None:
                os.close(stdout)  # the worker's ends; ours see end of file when the worker's close
                os.close(stdin)
        worker = Worker(worker_id, transport, pipes)  # type: ignore[arg-type]
        holder.append(worker)
        worker.watcher = asyncio.ensure_future(self._watch(worker))
        try:
            await self._await_ready(worker, shown)
        except BaseException:
            await self._kill(worker)
            raise
        logger.debug("stdio worker %d (pid %d) of environment %s started", worker_id, worker.pid, self._environment)
        return worker

    async def _await_ready(self, worker: Worker, shown: str) -> None:
        stdout_closed = worker.pipes.closed[1]
        timeout = self._startup_timeout if self._ready_line else min(STARTUP_GRACE, self._startup_timeout)
        await asyncio.wait([worker.ready, stdout_closed], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if worker.ready.done():
            return
        if not stdout_closed.done() and worker.returncode is None:
            if not self._ready_line:
                return  # alive after the grace period: a worker that prints nothing until asked
            raise RuntimeError(
                f"Environment '{self._environment}': the stdio worker ({shown}, pid {worker.pid}) did "
                f"not report ready within startup_timeout={self._startup_timeout:g}s.{worker.tail_text()} "
                "Raise executor_config.startup_timeout, or set executor_config.ready_line=False "
                "for a worker that prints nothing before its first command."
            )
        returncode = await self._reap(worker, timeout=2.0)
        await self._drain_stderr(worker)
        raise RuntimeError(
            f"Environment '{self._environment}': the stdio worker ({shown}, pid {worker.pid}) "
            f"{_exit_text(returncode)} during startup.{worker.tail_text()}"
        )

    async def _reap(self, worker: Worker, *, timeout: float) -> int | None:
        """Wait for the process to exit; kill it when it does not within ``timeout``."""
        if not await worker.wait(timeout):
            worker.signal(kill=True)
            await worker.wait(5.0)
        return worker.returncode

    async def _drain_stderr(self, worker: Worker) -> None:
        await asyncio.wait([worker.pipes.closed[2]], timeout=1.0)

    async def _kill(self, worker: Worker) -> None:
        worker.alive = False
        worker.signal(kill=True)
        await worker.wait(5.0)
        with contextlib.suppress(Exception):
            worker.stdin.close()
        if worker.watcher is not None and not worker.started:
            await asyncio.wait([worker.watcher], timeout=1.0)
        worker.close()

    # -- receiving -------------------------------------------------------------
    async def _watch(self, worker: Worker) -> None:
        """Wait for the worker's stdout to close; then it is gone."""
        await worker.pipes.closed[1]
        worker.alive = False
        if worker.started:
            await self._worker_died(worker)

    def _handle_frame(self, worker: Worker, data: bytes | bytearray | SplitFrame) -> None:
        """One frame of the worker's stdout: a JSON line, or a binary frame (a bytearray, or
        a :class:`~wove.protocol.SplitFrame` when it spanned several reads)."""
        if not isinstance(data, SplitFrame) and data[:1] != BINARY_START:
            data = data.strip()
            if not data:
                return
            if data[:1] not in (b"{", b"["):
                logger.warning("stdio worker %d (pid %d) wrote a line that is not a frame (ignored): %.200r",
                               worker.id, worker.pid, data)
                return
        try:
            events = decode_events(data)
        except ProtocolError as exc:
            logger.warning("stdio worker %d (pid %d) wrote a line that is not a valid frame (ignored): %s",
                           worker.id, worker.pid, exc)
            return
        self._warn_received(events, len(data))
        for event in events:
            event_type = event.get("type")
            if event_type == "log":
                if READY_KEY in event:
                    self._announced(worker, event.get("capabilities"))
                    if not worker.ready.done():
                        worker.ready.set_result(None)
                    continue
                if "run_id" not in event:  # a run's output reaches the caller through the runtime, tagged
                    logger.info("stdio worker %d (pid %d): %s", worker.id, worker.pid, event.get("message"))
                self._emit(event)
                continue
            if not worker.ready.done():
                worker.ready.set_result(None)
            if event_type in TERMINAL_EVENTS:
                run_id = str(event.get("run_id"))
                worker.runs.discard(run_id)
                if self._owner.get(run_id) is worker:
                    del self._owner[run_id]
            self._emit(event)

    def _bad_output(self, worker: Worker, problem: str) -> None:
        logger.warning("stdio worker %d (pid %d) wrote bytes that are not a frame (ignored): %s",
                       worker.id, worker.pid, problem)

    def _announced(self, worker: Worker, capabilities: Any) -> None:
        """A worker's ready line names what it speaks beyond Wove 2.x; the pool offers what
        every worker of it announced (a worker without the field announces nothing). A
        worker that announced ``binary_frames`` gets binary ``run_task`` frames from now on
        (unless ``executor_config.binary_frames`` is false)."""
        announced = frozenset(c for c in capabilities if isinstance(c, str)) \
            if isinstance(capabilities, list) else frozenset()
        self._worker_capabilities[worker.id] = announced
        self.capabilities = frozenset.intersection(*self._worker_capabilities.values())
        worker.binary = self._binary_frames and CAPABILITY_BINARY_FRAMES in announced

    def _stderr_line(self, worker: Worker, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip()
        if len(text) > 2000:
            text = text[:2000] + "…"
        worker.stderr_tail.append(text)
        logger.info("stdio worker %d (pid %d): %s", worker.id, worker.pid, text)

    async def _worker_died(self, worker: Worker) -> None:
        """Replace a dead worker; re-deliver or fail each run it held."""
        worker.alive = False
        if worker in self._workers:
            self._workers.remove(worker)
        try:
            returncode = await self._reap(worker, timeout=2.0)
            await self._drain_stderr(worker)
        finally:  # also when stop() gives up waiting: the process's pipes never outlive the loop
            worker.close()
        lifetime = time.monotonic() - worker.started_at
        head = (f"The stdio worker {worker.id} (pid {worker.pid}) of environment '{self._environment}' "
                f"{_exit_text(returncode)}")
        if not self._closing:
            logger.warning("%s after %.1fs with %d run(s) in progress.%s", head, lifetime, len(worker.runs),
                           worker.tail_text())
            self._rapid_deaths = self._rapid_deaths + 1 if lifetime < RAPID_DEATH_SECONDS else 0
            if self._rapid_deaths < RAPID_DEATH_LIMIT:
                self._replenish()
            else:
                logger.error("stdio workers of environment '%s' keep dying at startup; replacing them on "
                             "demand only", self._environment)
        for run_id in sorted(worker.runs):
            worker.runs.discard(run_id)
            if self._owner.get(run_id) is worker:
                del self._owner[run_id]
            entry = self._inflight.get(run_id)
            if entry is None:
                continue
            reason = (f"{head} while running task '{entry.frame.get('task_id')}' (run {run_id})."
                      f"{worker.tail_text()}")
            if not self._lost(run_id, reason, redeliverable=not self._closing):
                continue
            try:
                target = await self._pick()
            except Exception as exc:
                self._lost(run_id, f"{reason} Re-delivery failed: {exc}", redeliverable=False)
                continue
            if run_id not in self._inflight or self._closing:
                continue  # cancelled while waiting for a worker
            try:
                data, size = self._encode(target, entry.frame)
                self._check_payload(entry.frame, size)  # JSON is larger than binary, for another worker
            except Exception as exc:  # pickled fine the first time; be safe anyway
                self._lost(run_id, f"{reason} Re-delivery failed: {exc}", exc, redeliverable=False)
                continue
            self._assign(target, entry.frame, data, size)


def _exit_text(returncode: int | None) -> str:
    if returncode is None:
        return "stopped answering (its stdout closed while it kept running)"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name} (exit status {returncode})"
    return f"exited with exit code {returncode}"
