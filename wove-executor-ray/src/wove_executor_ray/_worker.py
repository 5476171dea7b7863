"""What runs inside the Ray cluster: the Wove payload task and the idempotency ledger actor.

This module is pickled *by value* when Ray ships it (the adapter registers it with
``ray.cloudpickle.register_pickle_by_value``), so Ray workers need neither this
distribution nor the import of this module: a worker with ``wove-backend`` runs the
payload through the one worker engine (:func:`wove_backend.run_engine_payload`) and
returns its JSON-safe status; a worker with only Wove 2.x falls back to Wove 2.x's
entry point ``wove.integrations.worker.run`` (whose outcome travels in the callback).

Everything here imports only the standard library and ``ray`` at module level (and
``ray`` only inside functions), so the functions can be pickled without dragging
anything else along.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections import OrderedDict
from typing import Any

__all__ = ["IdempotencyLedger", "run_payload"]


def run_payload(payload: dict[str, Any]) -> Any:
    """The Ray task of one Wove run: run ``payload``; return its status (or a 2.x worker's value).

    With ``wove-backend`` on the worker the return value is
    :func:`wove_backend.engine_status`: ``{"wove_status": 1, "posted": True, ...}`` when the
    terminal event reached the caller through the callback, otherwise it carries the
    encoded terminal event, which the adapter delivers from the ObjectRef.

    A ``ray.cancel`` (without ``force``) reaches a running task as a simulated SIGINT in
    the worker's main thread; while the payload runs, a signal handler on its loop turns
    that into a cancellation of the Wove run (an async task stops; a sync one is
    abandoned), so the task returns promptly instead of running on.
    """
    try:
        from wove_backend import run_engine_payload
    except ImportError:  # a worker with Wove 2.x only (or an older wove-backend)
        from wove.integrations.worker import run

        return run(payload)
    loop = _PROCESS.get("loop")
    if loop is None or loop.is_closed() or loop.is_running():
        # running here means broken: an interrupt (ray.cancel's simulated SIGINT) escaped a
        # previous run at a point that left the loop marked running; a fresh loop serves on
        loop = _PROCESS["loop"] = asyncio.new_event_loop()
    threads = _PROCESS.get("threads")
    if threads is None:
        threads = _PROCESS["threads"] = _daemon_threads()
    try:
        return loop.run_until_complete(_run_cancellable(payload, run_engine_payload, threads))
    finally:
        _cancel_leftovers(loop)


def _cancel_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what a run left on the shared loop (a heartbeat still being posted; everything,
    when an interrupt escaped), as ``asyncio.run`` would: nothing of it resumes in the next run."""
    if loop.is_running():  # left marked running by an escaped interrupt: the next run replaces it
        return
    leftovers = [task for task in asyncio.all_tasks(loop) if not task.done()]
    if not leftovers:
        return
    for task in leftovers:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))


class _ProcessState(dict):  # type: ignore[type-arg]
    """State of this process only: it pickles as an empty one (this module travels by value,
    and a loop or threads cannot, nor should they)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_ProcessState, ())


#: Per Ray worker process (this module is unpickled once per process and function): the
#: event loop the runs share (one run at a time: Ray runs one task at a time in the main
#: thread) and the threads for sync callables. Reusing them saves a loop and a thread
#: start per run.
_PROCESS: dict[str, Any] = _ProcessState()


def _daemon_threads() -> Any:
    """An executor of daemon threads, started only when none is idle.

    Ray runs one task at a time in a worker process, so one thread is busy at a time, plus
    those of sync runs cancelled without ``force_cancel`` (Python cannot stop a thread:
    they run on, abandoned). Daemon threads never keep the worker process from exiting
    (``ThreadPoolExecutor`` joins its threads at exit).
    """
    import concurrent.futures
    import queue

    class DaemonThreads(concurrent.futures.Executor):
        def __init__(self) -> None:
            self._work: queue.SimpleQueue[Any] = queue.SimpleQueue()
            self._lock = threading.Lock()
            self._idle = 0

        def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
            future: concurrent.futures.Future[Any] = concurrent.futures.Future()
            with self._lock:
                start = self._idle == 0
                if not start:
                    self._idle -= 1  # that idle thread takes this call
            self._work.put((future, fn, args, kwargs))
            if start:
                threading.Thread(target=self._serve, name="wove-ray-sync", daemon=True).start()
            return future

        def _serve(self) -> None:
            while True:
                future, fn, args, kwargs = self._work.get()
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args, **kwargs))
                    except BaseException as exc:
                        future.set_exception(exc)
                del future, fn, args, kwargs
                with self._lock:
                    self._idle += 1

    return DaemonThreads()


async def _run_cancellable(payload: dict[str, Any], run_engine_payload: Any, threads: Any) -> Any:
    loop = asyncio.get_running_loop()
    cancel = asyncio.Event()
    if threading.current_thread() is not threading.main_thread():  # pragma: no cover - not Ray's way
        return await run_engine_payload(payload, cancel_event=cancel, executor=threads)
    wakeup = _wakeup_socket(loop)

    def on_sigint(signum: int, frame: Any) -> None:
        loop.call_soon_threadsafe(cancel.set)

    # (loop.add_signal_handler does the same, but validates the signal against every valid
    # signal on each call: a tenth of a millisecond per run.)
    previous = signal.signal(signal.SIGINT, on_sigint)
    previous_fd = signal.set_wakeup_fd(wakeup.fileno(), warn_on_full_buffer=False)
    try:
        return await run_engine_payload(payload, cancel_event=cancel, executor=threads)
    finally:
        signal.set_wakeup_fd(previous_fd)
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)


def _wakeup_socket(loop: asyncio.AbstractEventLoop) -> Any:
    """The write end of a socket pair the loop reads: the signal module writes to it when a
    signal arrives (``ray.cancel``'s simulated SIGINT included), which wakes the loop so the
    Python handler runs even while the loop waits on a sync task's thread."""
    pair = _PROCESS.get("wakeup")
    if pair is None or pair[0] is not loop:
        import socket

        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)

        def drain() -> None:
            try:
                while reader.recv(4096):
                    pass
            except (BlockingIOError, InterruptedError):
                pass

        loop.add_reader(reader.fileno(), drain)
        pair = _PROCESS["wakeup"] = (loop, reader, writer)
    return pair[2]


class _Entry:
    __slots__ = ("expires", "ref", "ttl")

    def __init__(self, ref: Any, ttl: float) -> None:
        self.ref = ref
        self.ttl = ttl
        #: monotonic time the entry expires (infinity while the task runs)
        self.expires = float("inf")


class IdempotencyLedger:
    """An async Ray actor: one Ray task per ``delivery_idempotency_key``.

    The adapter creates it as a named, detached actor (``wove-idempotency`` in the Ray
    namespace ``executor_config.idempotency_namespace``, default ``wove``) the first time
    a run with a key is submitted, so every Wove executor connected to the cluster shares
    it. :meth:`submit` starts the task for a key it does not know, and otherwise hands out
    the ObjectRef of the task it already started, which it owns (so the result outlives
    the submitting process). An entry lasts while its task runs and ``ttl`` seconds after
    it finished; an entry whose task failed (worker died, cancelled) is dropped, so the
    next submission with that key runs again. At most ``capacity`` finished entries are
    kept (oldest dropped first).
    """

    def __init__(self) -> None:
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._functions: dict[str, Any] = {}
        self._followers: set[asyncio.Task[None]] = set()

    def _function(self, options: dict[str, Any]) -> Any:
        import json

        import ray

        signature = json.dumps(options, sort_keys=True, default=repr)
        function = self._functions.get(signature)
        if function is None:
            function = self._functions[signature] = ray.remote(run_payload).options(**options)
        return function

    def _expire(self, capacity: int) -> None:
        now = time.monotonic()
        for key in [key for key, entry in self._entries.items() if entry.expires <= now]:
            del self._entries[key]
        finished = [key for key, entry in self._entries.items() if entry.expires != float("inf")]
        for key in finished[: max(0, len(finished) - capacity)]:
            del self._entries[key]

    async def submit(self, key: str, payload: dict[str, Any], options: dict[str, Any], ttl: float,
                     capacity: int) -> tuple[list[Any], bool]:
        """The ObjectRef (in a list, so Ray passes the reference) of ``key``'s task, and
        whether this call started it."""
        self._expire(capacity)
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            return [entry.ref], False
        entry = _Entry(self._function(options).remote(payload), ttl)
        self._entries[key] = entry
        follower = asyncio.ensure_future(self._follow(key, entry))
        self._followers.add(follower)
        follower.add_done_callback(self._followers.discard)
        return [entry.ref], True

    async def _follow(self, key: str, entry: _Entry) -> None:
        try:
            await entry.ref
        except BaseException:
            if self._entries.get(key) is entry:  # no outcome: the next submission runs again
                del self._entries[key]
            return
        entry.expires = time.monotonic() + entry.ttl

    def forget(self, key: str, task_id: str) -> bool:
        """Drop ``key`` if it still names the task ``task_id`` (hex); True when dropped."""
        entry = self._entries.get(key)
        if entry is None or entry.ref.task_id().hex() != task_id:
            return False
        del self._entries[key]
        return True

    def cancel(self, key: str, task_id: str, force: bool) -> bool:
        """``ray.cancel`` the task of ``key`` (the ledger owns it) and drop the entry."""
        import ray

        entry = self._entries.get(key)
        if entry is None or entry.ref.task_id().hex() != task_id:
            return False
        del self._entries[key]
        ray.cancel(entry.ref, force=force)
        return True

    def keys(self) -> list[str]:
        """The keys it holds now (for diagnostics)."""
        return list(self._entries)
