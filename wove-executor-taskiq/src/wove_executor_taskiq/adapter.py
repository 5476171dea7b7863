"""TaskiqAdapter: sends Wove payloads as taskiq tasks and follows them in the result backend.

``taskiq`` is imported in :meth:`TaskiqAdapter.start`, never at import time.

Each run becomes one message of the task ``wove.run_backend_payload`` (Wove 2.x's name,
which :mod:`wove_executor_taskiq.worker` registers), with the task id set (``with_task_id``)
to the run's idempotency key or run id. The run's events normally reach the caller through
the signed callback. Taskiq itself has no cancellation and no liveness signal, so Wove's
task function adds both through the broker's result backend (the one channel every taskiq
deployment shares):

* liveness: while the task runs it writes the task's *progress* every 0.5 s (a beat
  number and its attempt); the caller loses a run whose beats stopped for 3 s (its
  worker died: with a list-queue broker the message is gone, so nothing would ever
  answer);
* cancellation: the caller writes the progress of ``wove-cancel:<task id>``; the task
  checks it with every beat (and before it starts) and cancels the run.

The watcher also reads the pending tasks' results every ``poll_interval`` seconds: the
run's outcome when the worker could not reach the callback server, or the error taskiq
recorded.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
from dataclasses import dataclass
from typing import Any

from wove.backend import BackendAdapter, ResultPoller
from wove.options import (
    CALLBACK_OPTIONS,
    INVALID,
    NON_NEGATIVE_SECONDS,
    POSITIVE_SECONDS,
    STR,
    Kind,
    Option,
    OptionSpec,
)

__all__ = ["CANCEL_PREFIX", "CANCEL_STATE", "DEFAULT_TASK_NAME", "TASKIQ_OPTIONS", "TaskiqAdapter",
           "TaskiqSubmission", "load_object"]

logger = logging.getLogger(__name__)

#: The taskiq task the adapter sends (Wove 2.x's name; see :mod:`wove_executor_taskiq.worker`).
DEFAULT_TASK_NAME = "wove.run_backend_payload"
#: The progress of ``<CANCEL_PREFIX><task id>`` in state :data:`CANCEL_STATE` asks the task to stop.
CANCEL_PREFIX = "wove-cancel:"
CANCEL_STATE = "wove-cancel"
#: The progress state of the task's liveness beats.
BEAT_STATE = "wove-running"
BEAT_SECONDS = 0.5
#: Seconds without a new beat after which a started task's worker is taken for dead.
STALL_SECONDS = 3.0
DEFAULT_POLL_INTERVAL = 0.05
DEFAULT_LOSS_GRACE_SECONDS = 0.5
#: Prefix of the Redis key that claims an idempotency key (with taskiq-redis result backends).
CLAIM_PREFIX = "wove:taskiq:claim:"


def load_object(path: str) -> Any:
    """``"package.module:attribute"`` (as ``taskiq worker`` takes a broker) -> that object.

    Raises:
        ValueError: not of that form, or the module or attribute is missing.
    """
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"{path!r} is not of the form 'package.module:attribute'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"module {module_name!r} cannot be imported ({exc})") from exc
    obj: Any = module
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"{module_name!r} has no attribute {attribute!r}") from None
    return obj


def _broker(value: Any) -> Any:
    if isinstance(value, str):
        value = load_object(value)
    return value if callable(getattr(value, "kick", None)) and hasattr(value, "result_backend") else INVALID


def _task(value: Any) -> Any:
    if isinstance(value, str):
        value = load_object(value)
    return value if callable(getattr(value, "kicker", None)) else INVALID


#: The taskiq executor's ``executor_config`` keys (Wove 2.x's, plus the callback and re-delivery keys).
TASKIQ_OPTIONS = OptionSpec("taskiq", [
    Option("task", Kind("a taskiq task (broker.task(...)) or 'module:attribute' naming one", _task),
           doc="the taskiq task to send payloads with (its broker is used); or give broker"),
    Option("broker", Kind("a taskiq broker or 'module:attribute' naming one", _broker),
           doc="the taskiq broker (with a result backend) to send through; or give task"),
    Option("task_name", STR, DEFAULT_TASK_NAME, "the task the workers run payloads with (with broker)"),
    Option("poll_interval", POSITIVE_SECONDS, DEFAULT_POLL_INTERVAL,
           "seconds between reads of the pending tasks' results"),
    Option("loss_grace_seconds", NON_NEGATIVE_SECONDS, DEFAULT_LOSS_GRACE_SECONDS,
           "how long a failed task waits for the worker's own terminal callback"),
    CALLBACK_OPTIONS,
])


@dataclass(eq=False)
class TaskiqSubmission:
    """One delivery of a run as a taskiq task."""

    run_id: str
    task_id: str
    attempt: int
    wove_task_id: str
    attached: bool = False
    cancelled: bool = False
    #: the last beat seen, and when (loop time)
    beat: Any = None
    beat_at: float = 0.0
    #: when the watcher next reads this task's result (loop time), and the gap after that
    next_check: float = 0.0
    interval: float = 0.0


class TaskiqAdapter(BackendAdapter):
    """Runs payloads as taskiq tasks (``executor_config`` keys in :data:`TASKIQ_OPTIONS`).

    * ``task`` (a taskiq task object, or ``"module:attribute"``) or ``broker`` (a broker
      with a result backend, or ``"module:attribute"``) and ``task_name`` (default
      ``wove.run_backend_payload``): Wove 2.x's keys and meanings.
    * ``poll_interval``: seconds between reads of the pending tasks' results.
    * ``loss_grace_seconds``: how long a failed task waits for the worker's own callback.

    The task id is the run's ``delivery_idempotency_key``, else its run id. A key whose
    task already has a result gets that outcome without running again; with a taskiq-redis
    result backend the key is also claimed atomically in Redis, so two submissions in flight
    at once run it once.
    """

    required_modules = ("taskiq",)
    install_hint = "wove-executor-taskiq"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._broker: Any = None
        self._owns_broker = False
        self._task_name = DEFAULT_TASK_NAME
        self._kicker_labels: dict[str, Any] = {}
        self._backend: Any = None
        self._poll = DEFAULT_POLL_INTERVAL
        self._grace = DEFAULT_LOSS_GRACE_SECONDS
        self._submissions: dict[str, TaskiqSubmission] = {}
        self._watcher: ResultPoller[TaskiqSubmission] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._redis_client: Any = None

    @property
    def broker(self) -> Any:
        """The taskiq broker tasks are sent through (None before start)."""
        return self._broker

    async def start(self) -> None:
        """Validate the config, start the broker when Wove loaded it, and start the watcher.

        Raises:
            ConfigError: an unknown key (with a did-you-mean), a bad value, neither ``task``
                nor ``broker``, or a broker without a result backend.
        """
        from wove.errors import ConfigError

        options = TASKIQ_OPTIONS.validate(self.config)
        task, broker = options["task"], options["broker"]
        if task is None and broker is None:
            raise ConfigError("taskiq executor: executor_config needs `broker` (a taskiq broker with a result "
                              "backend, or 'module:attribute' naming one) or `task` (a taskiq task).")
        self._task_name = options["task_name"]
        if task is not None:
            self._task_name = getattr(task, "task_name", self._task_name)
            self._kicker_labels = dict(getattr(task, "labels", {}) or {})
            broker = broker or getattr(task, "broker", None)
        from taskiq.result_backends.dummy import DummyResultBackend

        if broker is None or isinstance(broker.result_backend, DummyResultBackend):
            raise ConfigError("taskiq executor: the broker has no result backend; give it one "
                              "(broker.with_result_backend(RedisAsyncResultBackend(url))): Wove reads each task's "
                              "result and progress there (outcomes when callbacks cannot get through, cancellation, "
                              "whether its worker is alive).")
        self._broker, self._backend = broker, broker.result_backend
        if task is None and callable(getattr(broker, "find_task", None)) and broker.find_task(self._task_name) is None:
            logger.warning("taskiq executor: this process's broker has no task %r registered; the workers' broker "
                           "must have it (wove_executor_taskiq.worker.register(broker)), or they drop the messages "
                           "with a warning and the runs wait for their delivery_timeout.", self._task_name)
        self._poll = float(options["poll_interval"])
        self._grace = float(options["loss_grace_seconds"])
        if isinstance(self.config.get("broker"), str) or isinstance(self.config.get("task"), str):
            await broker.startup()  # a broker Wove loaded is Wove's to start and stop
            self._owns_broker = True
        self._watcher = ResultPoller(self._submissions, is_pending=self.is_pending, read=self._read_results,
                                     check_liveness=self._check_liveness, poll_interval=self._poll,
                                     what="taskiq executor")
        self._watcher.start()

    def _what(self, submission: TaskiqSubmission) -> str:
        return f"taskiq task {submission.wove_task_id!r} ({self._task_name})"

    def _redis(self) -> Any:
        """A Redis client on the result backend's pool (taskiq-redis backends), else None.

        One client for the adapter's life (building a redis-py client per call costs more
        than the call); ``async with`` on it releases nothing but its connection.
        """
        if self._redis_client is None:
            pool = getattr(self._backend, "redis_pool", None)
            if pool is None:
                return None
            from redis.asyncio import Redis

            self._redis_client = _SharedRedis(Redis(connection_pool=pool))
        return self._redis_client

    def _result_key(self, task_id: str) -> str:
        prefix = getattr(self._backend, "prefix_str", None)
        return f"{prefix}:{task_id}" if prefix else task_id

    # -- submitting --------------------------------------------------------------------
    async def submit(self, payload: dict[str, Any], frame: dict[str, Any]) -> TaskiqSubmission:
        """Send ``payload`` as taskiq task ``<idempotency key or run id>`` (or attach to it)."""
        from taskiq.kicker import AsyncKicker

        run_id = str(payload["run_id"])
        key = (payload.get("delivery") or {}).get("delivery_idempotency_key")
        task_id = str(key) if key else run_id
        attempt = int(payload.get("attempt") or 1)
        attached = False
        if key and attempt == 1:
            attached = await self._attach_or_claim(task_id)
        elif attempt > 1:
            await self._forget_task(task_id, keep_claim=True)
        submission = TaskiqSubmission(run_id=run_id, task_id=str(payload["task_id"]), attempt=attempt,
                                      wove_task_id=task_id, attached=attached)
        if not attached:
            kicker: Any = AsyncKicker(task_name=self._task_name, broker=self._broker, labels=dict(self._kicker_labels))
            await kicker.with_task_id(task_id).kiq(payload)
        assert self._watcher is not None
        self._watcher.add(submission)
        return submission

    async def _attach_or_claim(self, task_id: str) -> bool:
        """True when a task of this id ran or runs already (this run waits for its outcome)."""
        if await self._backend.is_result_ready(task_id):
            result = await self._backend.get_result(task_id)
            if not result.is_err and _outcome_type(result.return_value) in ("task_result", "task_error"):
                return True
            await self._forget_task(task_id, keep_claim=False)  # cancelled or failed before: run afresh
        redis = self._redis()
        if redis is None:
            return False  # no atomic claim on this result backend: a result was the only sign
        async with redis:
            claimed = await redis.set(CLAIM_PREFIX + task_id, b"1", nx=True,
                                      ex=getattr(self._backend, "result_ex_time", None) or None)
        return not claimed

    async def _forget_task(self, task_id: str, *, keep_claim: bool) -> None:
        """Remove a task's earlier result, progress and cancel flag (taskiq-redis result backends)."""
        redis = self._redis()
        if redis is None:
            return
        keys = [self._result_key(task_id), self._result_key(task_id) + "__progress",
                self._result_key(CANCEL_PREFIX + task_id) + "__progress"]
        if not keep_claim:
            keys.append(CLAIM_PREFIX + task_id)
        async with redis:
            await redis.delete(*keys)

    # -- cancelling --------------------------------------------------------------------
    async def cancel(self, run_id: str, submission: Any, frame: dict[str, Any]) -> None:
        """Ask the task to stop (through the result backend), unless another pending run waits for it."""
        from taskiq.depends.progress_tracker import TaskProgress

        if not isinstance(submission, TaskiqSubmission):
            return
        submission.cancelled = True
        self._submissions.pop(run_id, None)
        if submission.attached or any(s.wove_task_id == submission.wove_task_id for s in self._submissions.values()):
            return
        await self._backend.set_progress(CANCEL_PREFIX + submission.wove_task_id,
                                         TaskProgress(state=CANCEL_STATE, meta=None))
        await self._release_claim(submission.wove_task_id)

    async def _release_claim(self, task_id: str) -> None:
        redis = self._redis()
        if redis is not None:
            async with redis:
                await redis.delete(CLAIM_PREFIX + task_id)

    # -- watching ----------------------------------------------------------------------
    async def _ready(self, task_ids: list[str]) -> list[bool]:
        """Which of the tasks have a result (one pipelined round trip with taskiq-redis backends)."""
        redis = self._redis()
        if redis is None:
            return list(await asyncio.gather(*(self._backend.is_result_ready(t) for t in task_ids)))
        async with redis, redis.pipeline(transaction=False) as pipe:
            for task_id in task_ids:
                pipe.exists(self._result_key(task_id))
            return [bool(found) for found in await pipe.execute()]

    async def _progress(self, task_ids: list[str]) -> list[Any]:
        """The tasks' progress (one pipelined round trip with taskiq-redis backends)."""
        from taskiq.depends.progress_tracker import TaskProgress

        redis = self._redis()
        if redis is None or not hasattr(TaskProgress, "model_validate"):  # pydantic 1: the backend decodes
            return list(await asyncio.gather(*(self._backend.get_progress(t) for t in task_ids)))

        async with redis, redis.pipeline(transaction=False) as pipe:
            for task_id in task_ids:
                pipe.get(self._result_key(task_id) + "__progress")
            values = await pipe.execute()
        return [None if value is None else TaskProgress[Any].model_validate(self._backend.serializer.loadb(value))
                for value in values]

    async def _read_results(self, due: list[TaskiqSubmission]) -> None:
        task_ids = sorted({s.wove_task_id for s in due})
        if not task_ids:
            return
        ready = await self._ready(task_ids)
        for task_id, is_ready in zip(task_ids, ready):
            if not is_ready:
                continue
            runs = [s for s in self._submissions.values() if s.wove_task_id == task_id]
            for submission in runs:
                del self._submissions[submission.run_id]
            runs = [s for s in runs if self.is_pending(s.run_id)]
            if not runs:
                continue
            result = await self._backend.get_result(task_id)
            for submission in runs:
                if result.is_err:
                    self._spawn(self._failed(submission, result.error))
                else:
                    self._settle(submission, result.return_value)

    async def _check_liveness(self, now: float) -> None:
        """Lose started tasks whose beats (progress written by Wove's task) stopped."""
        watched = [s for s in self._submissions.values() if not s.cancelled]
        progress = await self._progress([s.wove_task_id for s in watched])
        for submission, current in zip(watched, progress):
            meta = getattr(current, "meta", None)
            if getattr(current, "state", None) != BEAT_STATE or not isinstance(meta, dict) \
                    or meta.get("attempt") != submission.attempt:
                continue  # not started yet (or an earlier attempt's last beat)
            beat = (meta.get("beat"), meta.get("worker"))
            if beat != submission.beat:
                submission.beat, submission.beat_at = beat, now
                continue
            if now - submission.beat_at >= STALL_SECONDS and self.is_pending(submission.run_id):
                self._submissions.pop(submission.run_id, None)
                await self._release_claim(submission.wove_task_id)  # a later submission of its key runs afresh
                self.report_lost(submission.run_id, f"taskiq executor: {self._what(submission)} was running on "
                                 f"worker {meta.get('worker')}, which stopped beating {now - submission.beat_at:.1f} s "
                                 "ago: the worker process died")

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- outcomes ----------------------------------------------------------------------
    def _settle(self, submission: TaskiqSubmission, status: Any) -> None:
        self._spawn(self.settle(submission.run_id, status, what=self._what(submission), grace=self._grace,
                                attached=submission.attached))

    async def _failed(self, submission: TaskiqSubmission, error: Any) -> None:
        if submission.cancelled or await self.wait_for_terminal(submission.run_id, self._grace):
            return
        text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else repr(error)
        hint = ""
        if "UnknownTaskError" in text or "not found" in text:
            hint = (f"; the workers have no task {self._task_name!r}: register it with "
                    "wove_executor_taskiq.worker.register(broker)")
        self.report_lost(submission.run_id, f"taskiq executor: {self._what(submission)} failed before its worker "
                         f"reported an outcome: {text}{hint}.", redeliverable=not hint)

    async def close(self) -> None:
        """Stop the watcher; shut down the broker when Wove loaded it."""
        if self._watcher is not None:
            await self._watcher.stop()
            self._watcher = None
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._submissions.clear()
        if self._owns_broker and self._broker is not None:
            await self._broker.shutdown()
        self._broker = self._backend = self._redis_client = None
        self._owns_broker = False


class _SharedRedis:
    """A long-lived redis client usable as ``async with client as redis`` without closing it."""

    def __init__(self, client: Any) -> None:
        self.client = client

    async def __aenter__(self) -> Any:
        return self.client

    async def __aexit__(self, *exc: object) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


def _outcome_type(status: Any) -> str | None:
    """The terminal event type an engine status stands for (``task_result``...), if it says."""
    if not isinstance(status, dict):
        return None
    if status.get("posted") is True:
        return str(status.get("type"))
    try:
        event = json.loads(status.get("event") or "null")
    except (TypeError, ValueError):
        return None
    return str(event.get("type")) if isinstance(event, dict) else None

