"""CeleryAdapter: sends Wove payloads to Celery workers and reads their outcome back.

``celery`` is imported in :meth:`CeleryAdapter.start`, never at import time.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from wove.backend import BackendAdapter
from wove.errors import ConfigError

from ._bridge import CeleryThread
from ._options import (
    CELERY_OPTIONS,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_LOSS_GRACE_SECONDS,
    FORGET_AFTER_SECONDS,
    IN_PROGRESS_STATES,
    TASK_NAME,
    WORKER_TRACEBACK_LINES,
)

__all__ = [
    "CELERY_OPTIONS",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_LOSS_GRACE_SECONDS",
    "TASK_NAME",
    "CeleryAdapter",
    "CelerySubmission",
    "celery_task_id",
]

logger = logging.getLogger(__name__)

def celery_task_id(run_id: str, key: str | None = None, attempt: int = 1) -> str:
    """The Celery task id of a run's delivery.

    The run's ``delivery_idempotency_key`` when it has one (so a repeated submission with
    that key finds the task), else the run id; ``#<attempt>`` from the second delivery.
    """
    base = key if key is not None else run_id
    return base if attempt <= 1 else f"{base}#{attempt}"


@dataclass(eq=False)
class CelerySubmission:
    """One run's Celery task (a re-delivery gets a new one; runs with one key share it)."""

    run_id: str
    task_id: str
    #: the Wove task id of the run (its frame's ``task_id``)
    wove_task: str
    #: True when this run's own payload was sent (False: it follows another run's task)
    sent: bool = True
    cancelled: bool = False
    created: float = field(default_factory=time.monotonic)


class CeleryAdapter(BackendAdapter):
    """Sends each payload as a Celery task; reads its outcome from Celery's result backend.

    ``executor_config`` keys (:data:`CELERY_OPTIONS`):

    * ``app``: an existing Celery app; or ``broker_url`` (with ``result_backend``, older
      spelling ``backend_url``, ``app_name`` and ``app_config``) for an app Wove creates.
    * ``task_name`` (default ``wove.run_backend_payload``), ``queue``, ``send_task_options``.
    * ``terminate_on_cancel`` (default False) and ``terminate_signal`` (default SIGTERM):
      a cancel also terminates the pool process running the task, so a sync task stops.
    * ``connect_timeout`` (default 5 s), ``loss_grace_seconds`` (default 1 s).
    * the backend callback and re-delivery keys (:data:`wove.options.CALLBACK_OPTIONS`),
      ``result_channel`` among them.

    Any other key is a :class:`~wove.errors.ConfigError` at start, with a did-you-mean.

    The Celery task id is the run's ``delivery_idempotency_key`` when it has one: a
    submission whose key names a task that is running or finished (with a stored result)
    follows that task instead of running the payload again. Without a key it is the run
    id. A task that fails on the worker (the pool process died: ``WorkerLostError``; the
    workers do not know the task; Celery's time limit) ends the run with a ``task_error``
    whose source is ``transport``, or is delivered again under orphan policy ``requeue``
    when its worker died.
    """

    required_modules = ("celery",)
    install_hint = "wove-executor-celery"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._app: Any = None
        self._owns_app = False
        self._thread: CeleryThread | None = None
        self._kind = "none"
        self._task_name = TASK_NAME
        self._send_options: dict[str, Any] = {}
        self._terminate = False
        self._signal = "SIGTERM"
        self._grace = DEFAULT_LOSS_GRACE_SECONDS
        self._timeout = DEFAULT_CONNECT_TIMEOUT
        self._channel = "auto"
        self._runs: dict[str, CelerySubmission] = {}
        #: Celery task id -> the runs that wait for it (its sender first)
        self._tasks: dict[str, list[str]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def app(self) -> Any:
        """The Celery application (None before start)."""
        return self._app

    @property
    def result_reading(self) -> str:
        """How outcomes are read from the result backend: ``push`` (Redis...), ``rpc``,
        ``poll`` (other stored backends) or ``none`` (no result backend: callbacks only)."""
        return self._kind

    async def start(self) -> None:
        """Create (or take) the Celery app and check that its broker and result backend answer.

        Raises:
            ConfigError: an unknown ``executor_config`` key (with a did-you-mean), a bad
                value, neither ``app`` nor ``broker_url`` (or both), or ``result_channel``
                ``engine`` without a result backend.
            OSError: the broker or the result backend cannot be reached within
                ``connect_timeout`` (names the URL, password masked).
        """
        options = CELERY_OPTIONS.validate(self.config)
        app, broker = options["app"], options["broker_url"]
        if app is None and broker is None:
            raise ConfigError("celery executor: executor_config needs 'app' (a Celery application) or 'broker_url' "
                              "(such as 'amqp://guest:guest@127.0.0.1:5672//' or 'redis://127.0.0.1:6379/0').")
        if app is not None and (broker is not None or options["result_backend"] is not None
                                or options["app_config"] is not None):
            raise ConfigError("celery executor: executor_config sets 'app' together with broker_url / result_backend "
                              "/ app_config, which only configure an app Wove creates; configure your app instead.")
        self._task_name = options["task_name"]
        self._send_options = dict(options["send_task_options"] or {})
        if options["queue"] is not None:
            self._send_options["queue"] = options["queue"]
        self._terminate, self._signal = options["terminate_on_cancel"], options["terminate_signal"]
        self._grace, self._timeout = float(options["loss_grace_seconds"]), float(options["connect_timeout"])
        self._channel = options["result_channel"] or "auto"
        from celery import Celery

        if app is None:
            app = Celery(options["app_name"], broker=broker, backend=options["result_backend"], set_as_current=False)
            app.conf.update({"redis_socket_connect_timeout": self._timeout, "broker_connection_timeout": self._timeout,
                             **dict(options["app_config"] or {})})
            self._owns_app = True
        self._app = app
        self._loop = asyncio.get_running_loop()
        self._thread = CeleryThread(app, self.name, self._ready)
        try:
            self._kind = await asyncio.wait_for(self._call(self._connect), self._timeout + 10.0)
        except BaseException as exc:
            await self._stop_thread()
            if isinstance(exc, asyncio.TimeoutError):
                raise OSError(f"celery executor: the Celery broker {self._where()} did not answer within "
                              f"{self._timeout + 10.0:g} s.") from exc
            raise
        if self._kind == "none":
            if self._channel == "engine":
                await self._stop_thread()
                raise ConfigError("celery executor: executor_config.result_channel 'engine' needs a Celery result "
                                  "backend; set executor_config.result_backend (such as 'redis://127.0.0.1:6379/1' "
                                  "or 'rpc://').")
            logger.warning("celery executor: the Celery app has no result backend, so outcomes come back only through "
                           "the callback server, and a worker that dies mid-task is not detected (set "
                           "executor_config.result_backend, such as 'rpc://' or a Redis URL).")
        self._sweeper = asyncio.ensure_future(self._sweep())

    def _where(self) -> str:
        from kombu.utils.url import maybe_sanitize_url

        url = self._app.conf.broker_url if self._app is not None else None
        return f"at {maybe_sanitize_url(url)}" if url else "(the app's default broker)"

    def _connect(self) -> str:
        """On the Celery thread: reach the broker and the result backend; return the reading mode."""
        assert self._thread is not None
        from kombu.utils.url import maybe_sanitize_url

        kind = self._thread.setup()
        try:
            with self._app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, interval_start=0.2, timeout=self._timeout)
        except Exception as exc:
            raise OSError(f"celery executor cannot reach the Celery broker {self._where()} within "
                          f"executor_config.connect_timeout={self._timeout:g} s: {type(exc).__name__}: {exc}. Check "
                          "executor_config.broker_url and that the broker is running and reachable from here.") from exc
        backend = self._app.backend
        if kind == "push":
            try:
                backend.get("wove-celery-probe")
            except Exception as exc:
                url = maybe_sanitize_url(str(self._app.conf.result_backend))
                raise OSError(f"celery executor cannot reach the Celery result backend at {url}: "
                              f"{type(exc).__name__}: {exc}. Check executor_config.result_backend.") from exc
        return kind

    async def _call(self, job: Callable[[], Any]) -> Any:
        assert self._thread is not None
        return await asyncio.wrap_future(self._thread.call(job))

    # -- submit ------------------------------------------------------------------------
    async def submit(self, payload: dict[str, Any], frame: dict[str, Any]) -> CelerySubmission:
        """Send ``payload`` as Celery task ``celery_task_id(...)`` to ``task_name``.

        A run with a ``delivery_idempotency_key`` whose task is in flight here, or (with a
        stored result backend) running or finished on the workers, follows that task
        instead of sending the payload again. Keyed payloads ask the worker to keep the
        outcome in the Celery result (``keep_outcome``), so every run with the key gets it.
        """
        run_id, wove_task = str(payload["run_id"]), str(payload.get("task_id"))
        attempt = int(payload.get("attempt") or 1)
        raw = payload.get("delivery")
        delivery: dict[str, Any] = raw if isinstance(raw, dict) else {}
        raw_key = delivery.get("delivery_idempotency_key")
        key = str(raw_key) if raw_key is not None else None
        task_id = celery_task_id(run_id, key, attempt)
        submission = CelerySubmission(run_id=run_id, task_id=task_id, wove_task=wove_task)
        self._runs[run_id] = submission
        stale = False
        if key is not None:
            if task_id in self._tasks:  # another run of this executor waits for that task
                submission.sent = False
                self._tasks[task_id].append(run_id)
                return submission
            self._tasks[task_id] = [run_id]  # runs with this key that come meanwhile attach
            if self._kind in ("push", "poll"):
                try:
                    state, value = await self._call(lambda: self._stored(task_id))
                except BaseException:
                    self._drop(run_id)
                    raise
                if state == "SUCCESS":  # it ran already: its kept outcome, for every waiting run
                    runs = [self._runs.pop(run, None) for run in self._tasks.pop(task_id, [])]
                    for waiting in runs:
                        if waiting is not None:
                            waiting.sent = False
                            self._spawn(self._settle_run(waiting, state, value, None))
                    return submission
                if state in IN_PROGRESS_STATES:  # it runs on a worker now: wait for it
                    submission.sent = False
                    await self._call(lambda: self._watch(task_id))
                    return submission
                # FAILURE, REVOKED or never seen (PENDING): run it (again)
                stale = state in ("FAILURE", "REVOKED")
        else:
            self._tasks[task_id] = [run_id]
        try:
            await self._call(lambda: self._send(task_id, payload, forget=stale))
        except BaseException:
            self._drop(run_id)
            raise
        return submission

    def _drop(self, run_id: str) -> None:
        submission = self._runs.pop(run_id, None)
        if submission is not None:
            runs = self._tasks.get(submission.task_id)
            if runs is not None and run_id in runs:
                runs.remove(run_id)
                if not runs:
                    del self._tasks[submission.task_id]

    def _stored(self, task_id: str) -> tuple[str, Any]:
        """On the Celery thread: the state and result a stored backend holds for ``task_id``."""
        meta = self._app.backend.get_task_meta(task_id, cache=False)
        return str(meta.get("status")), meta.get("result")

    def _watch(self, task_id: str) -> None:
        assert self._thread is not None
        self._thread.watch(task_id, existing=True)

    def _send(self, task_id: str, payload: dict[str, Any], forget: bool = False) -> None:
        """On the Celery thread: send, and watch the task (``send_task`` subscribes to its
        result before publishing, so no result arrives unseen).

        ``forget``: first drop the final state stored for this id (a keyed run that failed
        or was revoked before runs again under its key).
        """
        assert self._thread is not None
        if forget:
            self._app.backend.forget(task_id)
        result = self._app.send_task(self._task_name, args=[payload], task_id=task_id, **self._send_options)
        self._thread.adopt(result)

    # -- outcomes ------------------------------------------------------------------------
    def _ready(self, task_id: str, state: str, value: Any, trace: str | None) -> None:
        """On the Celery thread: a watched task reached a final state."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._spawn, self._settle_task(task_id, state, value, trace))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _settle_task(self, task_id: str, state: str, value: Any, trace: str | None) -> None:
        runs = [self._runs.pop(run_id, None) for run_id in self._tasks.pop(task_id, [])]
        await asyncio.gather(*(self._settle_run(submission, state, value, trace) for submission in runs
                               if submission is not None and not submission.cancelled))

    async def _settle_run(self, submission: CelerySubmission, state: str, value: Any, trace: str | None) -> None:
        run_id, task_id = submission.run_id, submission.task_id
        if self.is_pending(run_id):
            what = f"Celery task {task_id!r} (run {run_id})"
            try:
                if state == "SUCCESS":
                    await self.settle(run_id, value, what=what, grace=self._grace, attached=not submission.sent)
                elif state == "REVOKED":
                    self.report_lost(run_id, f"celery executor: {what} was revoked on the Celery side "
                                     f"({type(value).__name__}: {value}) before it finished.", None,
                                     redeliverable=False)
                else:
                    await self._failed(submission, what, state, value, trace)
            except Exception as exc:  # never strand a run on a surprise
                logger.exception("celery executor: settling %s failed", what)
                self.report_lost(run_id, f"celery executor: reading the outcome of {what} failed: "
                                 f"{type(exc).__name__}: {exc}", exc, redeliverable=False)

    async def _failed(self, submission: CelerySubmission, what: str, state: str, exc: Any,
                      trace: str | None) -> None:
        run_id = submission.run_id
        if await self.wait_for_terminal(run_id, self._grace):
            return  # the worker posted the outcome before its task failed
        kind = type(exc).__name__ if isinstance(exc, BaseException) else state
        detail = f"{kind}: {exc}" if isinstance(exc, BaseException) else f"state {state}: {exc!r}"
        cause = exc if isinstance(exc, BaseException) else None
        if kind == "WorkerLostError":
            self.report_lost(run_id, f"celery executor: the Celery worker process running {what} died before the "
                             f"run finished ({detail}); the pool process was killed or crashed.", cause)
        elif kind == "NotRegistered":
            self.report_lost(run_id, f"celery executor: the Celery workers that received {what} do not know the task "
                             f"{self._task_name!r} ({detail}). Start them with `celery -A wove_executor_celery.worker "
                             "worker`, or add it to your app with wove_executor_celery.register_wove_task(app).",
                             cause, redeliverable=False)
        elif kind in ("TimeLimitExceeded", "SoftTimeLimitExceeded"):
            self.report_lost(run_id, f"celery executor: Celery's time limit stopped {what} ({detail}).", cause,
                             redeliverable=False)
        else:
            hint = ""
            if trace and "wove/backend.py" in trace and "post_event" in trace:
                hint = (" Its worker runs Wove 2.x, whose callbacks are unsigned: set "
                        "executor_config.require_signed_callbacks to false for Wove 2.x workers.")
            lines = trace.rstrip().splitlines()[-WORKER_TRACEBACK_LINES:] if trace else []
            tail = "\nWorker traceback (last lines):\n" + "\n".join(lines) if lines else ""
            self.report_lost(run_id, f"celery executor: {what} failed on the Celery worker before the run reported "
                             f"an outcome ({detail}).{hint}{tail}", cause, redeliverable=False)

    # -- cancel --------------------------------------------------------------------------
    async def cancel(self, run_id: str, submission: Any, frame: dict[str, Any]) -> None:
        """Revoke the run's Celery task (terminating its pool process with ``terminate_on_cancel``).

        A run that shares its task with other pending runs (one idempotency key) only stops
        waiting for it.
        """
        if not isinstance(submission, CelerySubmission):
            return
        submission.cancelled = True
        self._runs.pop(run_id, None)
        runs = self._tasks.get(submission.task_id, [])
        if run_id in runs:
            runs.remove(run_id)
        if any(self.is_pending(other) for other in runs):
            return
        self._tasks.pop(submission.task_id, None)
        try:
            await asyncio.wait_for(self._call(lambda: self._revoke(submission.task_id)), self._timeout)
        except asyncio.TimeoutError:
            logger.warning("celery executor: revoking Celery task %r did not finish within %g s", submission.task_id,
                           self._timeout)

    def _revoke(self, task_id: str) -> None:
        """On the Celery thread: stop watching, revoke, and mark the stored state REVOKED.

        Celery tells no running task that it was revoked; the Wove task on the worker reads
        the stored state (key-value backends) and cancels its run.
        """
        assert self._thread is not None
        self._thread.forget(task_id)
        self._app.control.revoke(task_id, terminate=self._terminate, signal=self._signal)
        if self._kind in ("push", "poll"):  # a stored state the worker can read
            self._app.backend.mark_as_revoked(task_id, reason="cancelled by its Wove caller")

    # -- housekeeping --------------------------------------------------------------------
    async def _sweep(self) -> None:
        """Stop watching Celery tasks whose runs all ended another way a while ago."""
        while True:
            await asyncio.sleep(FORGET_AFTER_SECONDS / 4)
            now = time.monotonic()
            stale = [task_id for task_id, runs in self._tasks.items()
                     if not any(self.is_pending(run) for run in runs)
                     and all(now - self._runs[run].created > FORGET_AFTER_SECONDS for run in runs if run in self._runs)]
            for task_id in stale:
                for run in self._tasks.pop(task_id, []):
                    self._runs.pop(run, None)
                if self._thread is not None:
                    self._thread.call(functools.partial(self._thread.forget, task_id))

    async def _stop_thread(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        owned = self._owns_app
        app = self._app

        def shutdown() -> None:
            thread.close()
            if owned:
                try:
                    app.close()
                except Exception as exc:
                    logger.debug("celery executor: closing the Celery app failed: %r", exc)

        thread.call(shutdown)
        await asyncio.get_running_loop().run_in_executor(None, thread.stop)

    async def close(self) -> None:
        """Stop watching and close the Celery app Wove created (bounded)."""
        tasks = [t for t in (self._sweeper, *self._background) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._sweeper = None
        self._runs.clear()
        self._tasks.clear()
        await self._stop_thread()
        self._app = None
