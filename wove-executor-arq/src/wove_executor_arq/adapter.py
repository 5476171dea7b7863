"""ARQAdapter: enqueues Wove payloads as arq jobs and follows them in Redis.

``arq`` is imported in :meth:`ARQAdapter.start`, never at import time.

Each run becomes one arq job of the function ``wove_run_backend_payload`` (Wove 2.x's name,
which :mod:`wove_executor_arq.worker` provides). The run's events normally reach the caller
through the signed callback; a watcher task also follows every pending job in Redis:

* its result (``arq:result:<job id>``, read 5 ms after submission, then backing off to
  every ``poll_interval`` seconds): the run's
  outcome when the worker could not reach the callback server, or the exception arq
  recorded (aborted, ``job_timeout``, function not found...);
* its liveness: Wove's job function keeps ``wove:arq:alive:<job id>`` fresh while it runs
  (every 0.5 s, expiring after 3 s). A job still marked in progress by arq whose liveness
  key expired ran on a worker that died: the run is lost (and the job is removed from
  arq, which would otherwise run it again only once its in-progress key expires, after
  ``job_timeout`` + 10 s).
"""

from __future__ import annotations

import asyncio
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

__all__ = ["ALIVE_KEY_PREFIX", "ARQ_OPTIONS", "DEFAULT_FUNCTION_NAME", "ARQAdapter", "ARQSubmission"]

logger = logging.getLogger(__name__)

#: The arq function the adapter enqueues (Wove 2.x's name; see :mod:`wove_executor_arq.worker`).
DEFAULT_FUNCTION_NAME = "wove_run_backend_payload"
#: Prefix of the key Wove's job function keeps fresh while a job runs (``<prefix><job id>``).
ALIVE_KEY_PREFIX = "wove:arq:alive:"
#: Seconds between the job function's refreshes of its liveness key, and the key's lifetime.
ALIVE_REFRESH_SECONDS = 0.5
ALIVE_TTL_SECONDS = 3.0
DEFAULT_POLL_INTERVAL = 0.05
DEFAULT_LOSS_GRACE_SECONDS = 0.5
#: Seconds a background ``Job.abort`` waits for the worker to confirm.
ABORT_CONFIRM_SECONDS = 10.0
_RESERVED_ENQUEUE_OPTIONS = {
    "_job_id": "Wove sets it: the run's delivery_idempotency_key, else its run id",
    "_queue_name": "use executor_config.queue_name",
}


def _pool(value: Any) -> Any:
    return value if callable(getattr(value, "enqueue_job", None)) else INVALID


def _redis_settings(value: Any) -> Any:
    if isinstance(value, (str, dict)) or hasattr(value, "host"):
        return value
    return INVALID


def _enqueue_options(value: Any) -> Any:
    if not isinstance(value, dict):
        return INVALID
    for key, why in _RESERVED_ENQUEUE_OPTIONS.items():
        if key in value:
            raise ValueError(f"it may not set {key!r} ({why})")
    return dict(value)


#: The arq executor's ``executor_config`` keys (Wove 2.x's, plus the callback and re-delivery keys).
ARQ_OPTIONS = OptionSpec("arq", [
    Option("pool", Kind("an arq ArqRedis pool (arq.create_pool(...))", _pool),
           doc="an ArqRedis pool to enqueue with (not closed by Wove); or give redis_settings"),
    Option("redis_settings", Kind("an arq RedisSettings, a dict of its fields, or a redis:// URL", _redis_settings),
           doc="where Redis is: arq.connections.RedisSettings, a dict of its fields, or a redis:// URL"),
    Option("function_name", STR, DEFAULT_FUNCTION_NAME, "the arq function the workers run the payload with"),
    Option("enqueue_options", Kind("a dict of enqueue_job keyword arguments", _enqueue_options),
           doc="keyword arguments for enqueue_job: _defer_by, _defer_until, _expires, _job_try (not _job_id)"),
    Option("queue_name", STR, doc="the arq queue (default: the pool's, arq:queue)"),
    Option("poll_interval", POSITIVE_SECONDS, DEFAULT_POLL_INTERVAL,
           "seconds between reads of the pending jobs' results in Redis"),
    Option("loss_grace_seconds", NON_NEGATIVE_SECONDS, DEFAULT_LOSS_GRACE_SECONDS,
           "how long a failed job waits for the worker's own terminal callback"),
    CALLBACK_OPTIONS,
])


@dataclass(eq=False)
class ARQSubmission:
    """One delivery of a run as an arq job."""

    run_id: str
    task_id: str
    job_id: str
    #: the job was already there (a repeated idempotency key): never aborted by this run
    attached: bool = False
    cancelled: bool = False
    #: the job function's liveness key was seen (so its expiry means a dead worker)
    seen_alive: bool = False
    strikes: int = 0
    #: when the watcher next reads this job's result (loop time), and the gap after that
    next_check: float = 0.0
    interval: float = 0.0


class ARQAdapter(BackendAdapter):
    """Runs payloads as arq jobs (``executor_config`` keys in :data:`ARQ_OPTIONS`).

    * ``pool`` (an ``ArqRedis``) or ``redis_settings`` (``RedisSettings``, a dict of its
      fields, or a ``redis://`` URL): Wove 2.x's keys and meanings.
    * ``function_name`` (default ``wove_run_backend_payload``), ``queue_name``,
      ``enqueue_options`` (``_defer_by``, ``_expires``...): as in Wove 2.x.
    * ``poll_interval``: seconds between reads of the pending jobs' results.
    * ``loss_grace_seconds``: how long a failed job waits for the worker's own callback.

    The arq job id (``_job_id``) is the run's ``delivery_idempotency_key``, else its run
    id. arq refuses a job id it still holds (queued, running, or its result kept): such a
    run waits for that job's outcome instead of running it again. Cancelling a run aborts
    its job (``Job.abort``; the workers need ``allow_abort_jobs=True``, which Wove's
    ``WorkerSettings`` sets).
    """

    required_modules = ("arq",)
    install_hint = "wove-executor-arq"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._pool: Any = None
        self._owns_pool = False
        self._function = DEFAULT_FUNCTION_NAME
        self._options: dict[str, Any] = {}
        self._queue_name = "arq:queue"
        self._poll = DEFAULT_POLL_INTERVAL
        self._grace = DEFAULT_LOSS_GRACE_SECONDS
        self._submissions: dict[str, ARQSubmission] = {}
        self._watcher: ResultPoller[ARQSubmission] | None = None
        self._background: set[asyncio.Task[Any]] = set()

    @property
    def pool(self) -> Any:
        """The ``ArqRedis`` pool jobs are enqueued with (None before start)."""
        return self._pool

    async def start(self) -> None:
        """Validate the config, connect to Redis (or take the given pool) and start the watcher.

        Raises:
            ConfigError: an unknown key (with a did-you-mean), a bad value, or neither
                ``pool`` nor ``redis_settings``.
            OSError: Redis cannot be reached.
        """
        from wove.errors import ConfigError

        options = ARQ_OPTIONS.validate(self.config)
        pool, settings = options["pool"], options["redis_settings"]
        if pool is None and settings is None:
            raise ConfigError("arq executor: executor_config needs `redis_settings` (arq RedisSettings, a dict of "
                              "its fields, or a redis:// URL) or `pool` (an ArqRedis from arq.create_pool).")
        if pool is not None and settings is not None:
            raise ConfigError("arq executor: executor_config sets both `pool` and `redis_settings`; give one.")
        self._function = options["function_name"]
        self._options = dict(options["enqueue_options"] or {})
        self._poll = float(options["poll_interval"])
        self._grace = float(options["loss_grace_seconds"])
        if pool is None:
            from arq.connections import RedisSettings, create_pool

            if isinstance(settings, str):
                try:
                    settings = RedisSettings.from_dsn(settings)
                except (RuntimeError, ValueError) as exc:
                    raise ConfigError(f"arq executor: executor_config.redis_settings {settings!r} is not a redis:// "
                                      f"URL ({exc}).") from exc
                settings.conn_retries = 0
            elif isinstance(settings, dict):
                try:
                    settings = RedisSettings(**{"conn_retries": 0, **settings})
                except TypeError as exc:
                    raise ConfigError(f"arq executor: executor_config.redis_settings has a key RedisSettings does "
                                      f"not know: {exc}.") from exc
            try:
                pool = await create_pool(settings)
            except Exception as exc:
                raise OSError(f"arq executor cannot reach Redis at {_describe(settings)}: {type(exc).__name__}: "
                              f"{exc}. Check executor_config.redis_settings and that Redis is running.") from exc
            self._owns_pool = True
        self._pool = pool
        self._queue_name = options["queue_name"] or getattr(pool, "default_queue_name", "arq:queue")
        self._watcher = ResultPoller(self._submissions, is_pending=self.is_pending, read=self._read_results,
                                     check_liveness=self._check_liveness, poll_interval=self._poll,
                                     what=f"arq executor (queue {self._queue_name!r})")
        self._watcher.start()

    def _what(self, submission: ARQSubmission) -> str:
        return f"arq job {submission.job_id!r} on queue {self._queue_name!r}"

    # -- submitting --------------------------------------------------------------------
    async def submit(self, payload: dict[str, Any], frame: dict[str, Any]) -> ARQSubmission:
        """Enqueue ``payload`` as arq job ``<idempotency key or run id>`` (or attach to that job)."""
        run_id = str(payload["run_id"])
        key = (payload.get("delivery") or {}).get("delivery_idempotency_key")
        job_id = str(key) if key else run_id
        if int(payload.get("attempt") or 1) > 1:
            await self._remove(job_id)  # a re-delivery: the earlier job of this id was lost
        attached = False
        for _ in range(5):
            job = await self._pool.enqueue_job(self._function, payload, _job_id=job_id,
                                               _queue_name=self._queue_name, **self._options)
            if job is not None:
                break
            # arq still holds a job of this id: attach to it, unless it failed (run it afresh)
            info = await self._job(job_id).result_info()
            if info is None or info.success:
                attached = True
                break
            await self._remove(job_id)
        else:
            raise RuntimeError(f"arq executor: arq job {job_id!r} kept appearing and disappearing while enqueued.")
        submission = ARQSubmission(run_id=run_id, task_id=str(payload["task_id"]), job_id=job_id, attached=attached)
        assert self._watcher is not None
        self._watcher.add(submission)
        return submission

    def _job(self, job_id: str) -> Any:
        from arq.jobs import Job

        return Job(job_id, self._pool, _queue_name=self._queue_name, _deserializer=self._pool.job_deserializer)

    async def _remove(self, job_id: str) -> None:
        """Take a job out of arq entirely (queue, definition, result, in-progress and retry keys)."""
        from arq.constants import (
            in_progress_key_prefix,
            job_key_prefix,
            result_key_prefix,
            retry_key_prefix,
        )

        async with self._pool.pipeline(transaction=True) as pipe:
            pipe.zrem(self._queue_name, job_id)
            pipe.delete(job_key_prefix + job_id, result_key_prefix + job_id, in_progress_key_prefix + job_id,
                        retry_key_prefix + job_id, ALIVE_KEY_PREFIX + job_id)
            await pipe.execute()

    # -- cancelling --------------------------------------------------------------------
    async def cancel(self, run_id: str, submission: Any, frame: dict[str, Any]) -> None:
        """Abort the run's arq job (``Job.abort``), unless another pending run waits for it."""
        if not isinstance(submission, ARQSubmission):
            return
        submission.cancelled = True
        self._submissions.pop(run_id, None)
        if submission.attached or any(s.job_id == submission.job_id for s in self._submissions.values()):
            return
        task = asyncio.ensure_future(self._abort(submission))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _abort(self, submission: ARQSubmission) -> None:
        job = self._job(submission.job_id)
        try:
            aborted = await job.abort(timeout=ABORT_CONFIRM_SECONDS, poll_delay=0.1)
        except asyncio.CancelledError:
            raise
        except asyncio.TimeoutError:
            logger.warning("arq executor: %s was not aborted within %g s: do its workers run with "
                           "allow_abort_jobs=True (Wove's WorkerSettings does)?", self._what(submission),
                           ABORT_CONFIRM_SECONDS)
            return
        except Exception as exc:  # the job ended another way (it raised, or arq lost it)
            logger.debug("arq executor: aborting %s: %r", self._what(submission), exc)
            return
        logger.debug("arq executor: %s aborted: %s", self._what(submission), aborted)

    # -- watching ----------------------------------------------------------------------
    async def _read_results(self, due: list[ARQSubmission]) -> None:
        from arq.constants import result_key_prefix
        from arq.jobs import deserialize_result

        job_ids = sorted({s.job_id for s in due})
        if not job_ids:
            return
        values = await self._pool.mget([result_key_prefix + job_id for job_id in job_ids])
        for job_id, value in zip(job_ids, values):
            if value is None:
                continue
            runs = [s for s in self._submissions.values() if s.job_id == job_id]
            for submission in runs:
                del self._submissions[submission.run_id]
            runs = [s for s in runs if self.is_pending(s.run_id)]
            if not runs:
                continue
            info = deserialize_result(value, deserializer=self._pool.job_deserializer)
            for submission in runs:
                if info.success:
                    await self._settle(submission, info.result)
                else:
                    self._spawn(self._failed(submission, info.result))

    async def _check_liveness(self, now: float) -> None:
        """Lose in-progress jobs whose liveness key (kept by Wove's job function) expired."""
        from arq.constants import in_progress_key_prefix, job_key_prefix, result_key_prefix

        watched = [s for s in self._submissions.values() if not s.cancelled]
        if not watched:
            return
        async with self._pool.pipeline(transaction=False) as pipe:
            for submission in watched:
                job_id = submission.job_id
                pipe.exists(in_progress_key_prefix + job_id)
                pipe.get(ALIVE_KEY_PREFIX + job_id)
                pipe.exists(job_key_prefix + job_id, result_key_prefix + job_id)
                pipe.zscore(self._queue_name, job_id)
            answers = await pipe.execute()
        for index, submission in enumerate(watched):
            in_progress, alive, stored, score = answers[4 * index:4 * index + 4]
            if alive is not None:
                submission.seen_alive = True
                submission.strikes = 0
                continue
            if in_progress and submission.seen_alive:
                why = ("was in progress on a worker that stopped refreshing its liveness key "
                       f"{ALIVE_KEY_PREFIX}{submission.job_id}: the worker process died")
            elif not in_progress and not stored and score is None:
                why = "no longer exists in Redis (deleted, or expired before a worker started it)"
            else:
                submission.strikes = 0
                continue
            submission.strikes += 1
            if submission.strikes >= 2 and self.is_pending(submission.run_id):
                self._submissions.pop(submission.run_id, None)
                await self._remove(submission.job_id)  # or arq would run it again later by itself
                self.report_lost(submission.run_id, f"arq executor: {self._what(submission)} {why}.")

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- outcomes ----------------------------------------------------------------------
    async def _settle(self, submission: ARQSubmission, status: Any) -> None:
        self._spawn(self.settle(submission.run_id, status, what=self._what(submission), grace=self._grace,
                                attached=submission.attached))

    async def _failed(self, submission: ARQSubmission, error: Any) -> None:
        if submission.cancelled or await self.wait_for_terminal(submission.run_id, self._grace):
            return
        text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else repr(error)
        redeliverable = True
        hint = ""
        if "not found" in str(error) and "function" in str(error):
            hint = (f"; the worker has no function {self._function!r}: add wove_executor_arq.worker.FUNCTIONS to "
                    "its WorkerSettings.functions (or run `arq wove_executor_arq.worker.WorkerSettings`)")
            redeliverable = False
        elif isinstance(error, asyncio.TimeoutError):
            hint = "; the worker's job_timeout ended it: raise job_timeout in its WorkerSettings"
            redeliverable = False
        elif isinstance(error, asyncio.CancelledError):
            hint = "; it was aborted"
            redeliverable = False
        self.report_lost(submission.run_id, f"arq executor: {self._what(submission)} failed before its worker "
                         f"reported an outcome: {text}{hint}.", redeliverable=redeliverable)

    async def close(self) -> None:
        """Stop the watcher and background aborts; close the pool Wove opened."""
        if self._watcher is not None:
            await self._watcher.stop()
            self._watcher = None
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._submissions.clear()
        if self._owns_pool and self._pool is not None:
            aclose = getattr(self._pool, "aclose", None)  # redis-py 5 (close() before)
            await (aclose() if aclose is not None else self._pool.close())
        self._pool = None
        self._owns_pool = False


def _describe(settings: Any) -> str:
    host = getattr(settings, "host", "?")
    return f"{host}:{getattr(settings, 'port', '?')} (database {getattr(settings, 'database', 0)})"

