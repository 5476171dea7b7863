"""RQAdapter: enqueues Wove payloads as RQ jobs and follows them through RQ's own records.

``rq`` and ``redis`` are imported in :meth:`RQAdapter.start`, never at import time.

Each run becomes one RQ job whose function (``wove_executor_rq.worker.run_payload`` by
default) runs the payload on the worker and returns its
:func:`wove.backend.engine_status`. The run's events normally reach the caller through
the signed callback; one watcher thread per environment also follows every pending job
through RQ's result streams (``rq:results:<job id>``, one blocking ``XREAD`` for all of
them) and through the job's status, so that

* a job that RQ records as failed (work horse killed, ``job_timeout``...) ends its run as
  lost (re-delivered under orphan policy ``requeue``),
* a job whose worker disappeared (it no longer listens on its command channel
  ``rq:pubsub:<worker>``) is lost too, within about two seconds,
* the run's outcome comes back through the job's result when the worker could not reach
  the callback server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from wove.backend import BackendAdapter
from wove.options import (
    CALLBACK_OPTIONS,
    INVALID,
    NON_NEGATIVE_SECONDS,
    STR,
    Kind,
    Option,
    OptionSpec,
)

__all__ = ["DEFAULT_FUNCTION", "RQ_OPTIONS", "RQAdapter", "RQSubmission", "rq_job_id"]

logger = logging.getLogger(__name__)

#: The job function the adapter enqueues (a dotted path the RQ worker imports).
DEFAULT_FUNCTION = "wove_executor_rq.worker.run_payload"
#: Seconds a failed job waits for the worker's own terminal callback before the run is lost.
DEFAULT_LOSS_GRACE_SECONDS = 0.5
#: Milliseconds one ``XREAD`` of the result streams blocks (new jobs join the next one).
XREAD_BLOCK_MS = 100
#: Seconds between checks that the workers of started jobs are still there.
LIVENESS_SECONDS = 0.5
#: Consecutive checks a started job's worker must be missing before the run is lost.
LIVENESS_STRIKES = 2
_RESERVED_ENQUEUE_OPTIONS = {
    "job_id": "Wove sets it: the run's delivery_idempotency_key, else its run id",
    "unique": "Wove enqueues with unique=True so a repeated idempotency key does not run twice",
    "pipeline": "each run is enqueued on its own",
}
_JOB_ID = re.compile(r"[A-Za-z0-9_-]+")
_FAILED_TYPES = ("FAILED", "STOPPED", "MAX_RETRIES_EXCEEDED")


def rq_job_id(value: str) -> str:
    """The RQ job id for a run id or idempotency key.

    RQ job ids may hold only letters, digits, ``_`` and ``-``; a value that does is used
    as it is (so a key ``report-2024-05`` is RQ job ``report-2024-05``). Any other value
    becomes its characters with the others replaced by ``_``, plus ``-`` and 16 hex digits
    of its SHA-256 (so two different keys never share a job).
    """
    if _JOB_ID.fullmatch(value):
        return value
    digest = hashlib.sha256(value.encode("utf-8")).hexdigest()[:16]
    return re.sub(r"[^A-Za-z0-9_-]", "_", value)[:120] + "-" + digest


def _queue(value: Any) -> Any:
    return value if callable(getattr(value, "enqueue", None)) and hasattr(value, "connection") else INVALID


def _enqueue_options(value: Any) -> Any:
    if not isinstance(value, dict):
        return INVALID
    for key, why in _RESERVED_ENQUEUE_OPTIONS.items():
        if key in value:
            raise ValueError(f"it may not set {key!r} ({why})")
    if value.get("result_ttl") == 0:
        raise ValueError("result_ttl=0 discards the job's result, which carries the run's outcome when the "
                         "worker cannot reach the callback server; leave it out or give a positive number")
    return dict(value)


#: The rq executor's ``executor_config`` keys (Wove 2.x's, plus the callback and re-delivery keys).
RQ_OPTIONS = OptionSpec("rq", [
    Option("queue", Kind("an rq.Queue", _queue), doc="an rq.Queue to enqueue on (instead of redis_url)"),
    Option("redis_url", STR, doc="Redis URL (redis://host:6379/0) of the RQ queues; or give queue"),
    Option("queue_name", STR, doc="the RQ queue to enqueue on (default 'default'; with redis_url)"),
    Option("enqueue_options", Kind("a dict of Queue.enqueue keyword arguments", _enqueue_options),
           doc="keyword arguments for Queue.enqueue: job_timeout, result_ttl, ttl, failure_ttl, retry, meta, "
               "at_front, description... (not job_id/unique/pipeline)"),
    Option("function", STR, DEFAULT_FUNCTION,
           "dotted path of the job function the workers run (wove.integrations.worker.run for Wove 2.x workers)"),
    Option("loss_grace_seconds", NON_NEGATIVE_SECONDS, DEFAULT_LOSS_GRACE_SECONDS,
           "how long a failed job waits for the worker's own terminal callback"),
    CALLBACK_OPTIONS,
])


def _redact(url: str) -> str:
    """A Redis URL without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username + ':' if parts.username else ':'}***@{parts.hostname}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass(eq=False)
class RQSubmission:
    """One delivery of a run as an RQ job."""

    run_id: str
    task_id: str
    job_id: str
    #: True when the job was already there (a repeated idempotency key): this run waits
    #: for another submission's job and never stops it.
    attached: bool = False
    #: last entry read from the job's result stream
    last_id: str = "0-0"
    cancelled: bool = False
    strikes: int = 0


class RQAdapter(BackendAdapter):
    """Runs payloads as RQ jobs (``executor_config`` keys in :data:`RQ_OPTIONS`).

    * ``queue`` (an ``rq.Queue``) or ``redis_url`` + ``queue_name`` (default ``default``):
      where jobs go (Wove 2.x's keys and meanings).
    * ``enqueue_options``: keyword arguments for ``Queue.enqueue`` (``job_timeout``,
      ``result_ttl``, ``failure_ttl``, ``retry``, ``meta``...; not ``job_id``/``unique``).
    * ``function``: the job function's dotted path (default :data:`DEFAULT_FUNCTION`;
      ``wove.integrations.worker.run`` for workers that run Wove 2.x).
    * ``loss_grace_seconds``: how long a failed job waits for the worker's own callback.

    The job id is the run's ``delivery_idempotency_key`` (see :func:`rq_job_id`), else
    its run id; a job already there under that id (queued, running or finished) is not
    enqueued again: the run waits for that job's outcome (from its RQ result). Cancelling
    a run stops its job: ``send_stop_job_command`` when it runs (the worker kills its work
    horse), ``Job.cancel`` while it waits in the queue.
    """

    required_modules = ("rq", "redis")
    install_hint = "wove-executor-rq"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._queue: Any = None
        self._connection: Any = None
        self._owns_connection = False
        self._options: dict[str, Any] = {}
        self._function = DEFAULT_FUNCTION
        self._grace = DEFAULT_LOSS_GRACE_SECONDS
        self._where = "?"
        self._submissions: dict[str, RQSubmission] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: concurrent.futures.ThreadPoolExecutor | None = None
        self._watcher: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending_calls: set[concurrent.futures.Future[Any]] = set()

    @property
    def queue(self) -> Any:
        """The ``rq.Queue`` jobs are enqueued on (None before start)."""
        return self._queue

    async def start(self) -> None:
        """Validate the config, connect to Redis (checked with a PING) and start the watcher.

        Raises:
            ConfigError: an unknown key (with a did-you-mean), a bad value, or neither
                ``queue`` nor ``redis_url``.
            OSError: Redis cannot be reached (names the URL without its password).
        """
        from wove.errors import ConfigError

        options = RQ_OPTIONS.validate(self.config)
        self._options = dict(options["enqueue_options"] or {})
        self._function = options["function"]
        self._grace = float(options["loss_grace_seconds"])
        queue, url, name = options["queue"], options["redis_url"], options["queue_name"]
        if queue is None and url is None:
            raise ConfigError("rq executor: executor_config needs `redis_url` (redis://host:6379/0, with "
                              "`queue_name`) or `queue` (an rq.Queue).")
        if queue is not None and url is not None:
            raise ConfigError("rq executor: executor_config sets both `queue` and `redis_url`; give one.")
        if queue is not None and name is not None and name != queue.name:
            raise ConfigError(f"rq executor: executor_config.queue_name {name!r} differs from the name of the given "
                              f"queue ({queue.name!r}); leave queue_name out.")
        self._loop = asyncio.get_running_loop()
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="wove-rq")
        if queue is None:
            from redis import Redis
            from rq import Queue

            self._connection = Redis.from_url(url, socket_connect_timeout=5.0)
            self._owns_connection = True
            queue = Queue(name or "default", connection=self._connection)
            self._where = f"queue {queue.name!r} at {_redact(url)}"
        else:
            self._connection = queue.connection
            self._where = f"queue {queue.name!r}"
        self._queue = queue
        try:
            await self._call(self._connection.ping)
        except Exception as exc:
            await self.close()
            raise OSError(f"rq executor cannot reach Redis for {self._where}: {type(exc).__name__}: {exc}. "
                          "Check executor_config.redis_url and that Redis is running.") from exc
        self._stopping.clear()
        self._watcher = threading.Thread(target=self._watch, name="wove-rq-watcher", daemon=True)
        self._watcher.start()

    async def _call(self, func: Any, *args: Any) -> Any:
        """Run a blocking Redis/RQ call on the adapter's thread (the loop never blocks on Redis)."""
        assert self._thread is not None and self._loop is not None
        return await self._loop.run_in_executor(self._thread, func, *args)

    # -- submitting --------------------------------------------------------------------
    async def submit(self, payload: dict[str, Any], frame: dict[str, Any]) -> RQSubmission:
        """Enqueue ``payload`` as RQ job ``<idempotency key or run id>`` (or attach to that job)."""
        run_id = str(payload["run_id"])
        delivery = payload.get("delivery") or {}
        key = delivery.get("delivery_idempotency_key")
        job_id = rq_job_id(str(key) if key else run_id)
        replace = int(payload.get("attempt") or 1) > 1
        # RQ's default description is the repr of the call, the whole payload: name the run instead.
        description = f"wove {payload.get('task_name') or payload['task_id']} (run {run_id})"
        attached = await self._call(self._enqueue, job_id, payload, replace, description)
        submission = RQSubmission(run_id=run_id, task_id=str(payload["task_id"]), job_id=job_id, attached=attached)
        with self._lock:
            self._submissions[run_id] = submission
        self._wake.set()
        if attached:
            logger.debug("rq: run %s attached to the existing RQ job %s", run_id, job_id)
        return submission

    def _enqueue(self, job_id: str, payload: dict[str, Any], replace: bool, description: str) -> bool:
        """Enqueue the job (thread); True when a job of that id was already there."""
        from rq.exceptions import DuplicateJobError, NoSuchJobError
        from rq.job import Job, JobStatus

        if replace:  # a re-delivery: the previous job of this id was lost
            self._delete(job_id)
        for _ in range(5):
            try:
                self._queue.enqueue(self._function, payload, job_id=job_id, unique=True,
                                    **{"description": description, **self._options})
                return False
            except DuplicateJobError:
                pass
            try:
                existing = Job.fetch(job_id, connection=self._connection, serializer=self._queue.serializer)
                status = existing.get_status()
            except NoSuchJobError:
                continue  # gone in between: enqueue it again
            if status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED):
                self._delete(job_id)  # its earlier execution did not finish: run it afresh
                continue
            return True
        raise RuntimeError(f"rq executor: RQ job {job_id!r} kept appearing and disappearing while it was enqueued.")

    def _delete(self, job_id: str) -> None:
        from rq.exceptions import NoSuchJobError
        from rq.job import Job

        try:
            Job.fetch(job_id, connection=self._connection, serializer=self._queue.serializer).delete()
        except NoSuchJobError:
            pass

    # -- cancelling --------------------------------------------------------------------
    async def cancel(self, run_id: str, submission: Any, frame: dict[str, Any]) -> None:
        """Stop the run's job: ``send_stop_job_command`` when running, ``Job.cancel`` when queued.

        A run attached to another submission's job (a repeated idempotency key) only stops
        waiting; so does one whose job another pending run of this environment waits for.
        """
        if not isinstance(submission, RQSubmission):
            return
        submission.cancelled = True
        with self._lock:
            self._submissions.pop(run_id, None)
            shared = any(other.job_id == submission.job_id for other in self._submissions.values())
        if submission.attached or shared:
            return
        await self._call(self._stop, submission.job_id)

    def _stop(self, job_id: str) -> None:
        from rq.command import send_stop_job_command
        from rq.exceptions import InvalidJobOperation, NoSuchJobError
        from rq.job import Job, JobStatus

        try:
            job = Job.fetch(job_id, connection=self._connection, serializer=self._queue.serializer)
            status = job.get_status()
            if status != JobStatus.STARTED:
                job.cancel()  # out of the queue before a worker takes it
                status = job.get_status()
            if status == JobStatus.STARTED:
                send_stop_job_command(self._connection, job_id, serializer=self._queue.serializer)
        except (NoSuchJobError, InvalidJobOperation) as exc:
            logger.debug("rq: stopping job %s: %r", job_id, exc)

    # -- watching ----------------------------------------------------------------------
    def _watch(self) -> None:
        """The watcher thread: result streams (blocking XREAD) and worker liveness."""
        next_liveness = time.monotonic() + LIVENESS_SECONDS
        while not self._stopping.is_set():
            try:
                with self._lock:
                    for run_id in [r for r in self._submissions if not self.is_pending(r)]:
                        del self._submissions[run_id]  # its outcome arrived through the callback
                    watched = list(self._submissions.values())
                if not watched:
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                streams: dict[str, str] = {}
                for submission in watched:
                    streams.setdefault(f"rq:results:{submission.job_id}", submission.last_id)
                answer = self._connection.xread(streams, block=XREAD_BLOCK_MS)
                for key, entries in answer or []:
                    job_id = (key.decode() if isinstance(key, bytes) else str(key)).rsplit(":", 1)[1]
                    for entry_id, fields in entries:
                        self._on_result(job_id, entry_id.decode() if isinstance(entry_id, bytes) else entry_id,
                                        fields)
                if time.monotonic() >= next_liveness:
                    self._check_liveness()
                    next_liveness = time.monotonic() + LIVENESS_SECONDS
            except Exception as exc:  # Redis went away for a moment, or an RQ surprise: keep watching
                if self._stopping.is_set():
                    return
                logger.warning("rq executor: watching RQ jobs on %s failed: %r; retrying", self._where, exc)
                self._stopping.wait(0.5)

    def _runs_of(self, job_id: str) -> list[RQSubmission]:
        with self._lock:
            return [s for s in self._submissions.values() if s.job_id == job_id]

    def _forget(self, submission: RQSubmission) -> None:
        with self._lock:
            if self._submissions.get(submission.run_id) is submission:
                del self._submissions[submission.run_id]

    def _on_result(self, job_id: str, entry_id: str, fields: dict[Any, Any]) -> None:
        from rq.results import Result

        runs = self._runs_of(job_id)
        for submission in runs:
            submission.last_id = entry_id
        runs = [submission for submission in runs if self.is_pending(submission.run_id)]
        if not runs:
            return  # the outcome came through the callback: nothing to decode
        result = Result.restore(job_id, entry_id, fields, connection=self._connection,
                                serializer=self._queue.serializer)
        kind = result.type.name
        if kind == "SUCCESSFUL":
            for submission in runs:
                self._forget(submission)
                self._schedule(self._settle(submission, result.return_value))
        elif kind in _FAILED_TYPES:
            for submission in runs:
                self._forget(submission)
                self._schedule(self._failed(submission, kind, result.exc_string or ""))
        # RETRIED: RQ runs the job again (enqueue_options retry); keep reading its stream

    def _check_liveness(self) -> None:
        """Lose started jobs whose worker no longer listens on its RQ command channel."""
        with self._lock:
            watched = [s for s in self._submissions.values() if not s.cancelled]
        job_ids = sorted({s.job_id for s in watched})
        if not job_ids:
            return
        pipe = self._connection.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(f"rq:job:{job_id}", "status", "worker_name")
        states = dict(zip(job_ids, pipe.execute()))
        workers = sorted({w.decode() for status, w in states.values()
                          if status == b"started" and w})
        listening: dict[str, int] = {}
        if workers:
            answer = self._connection.pubsub_numsub(*(f"rq:pubsub:{w}" for w in workers))
            listening = {(c.decode() if isinstance(c, bytes) else c).split(":", 2)[2]: int(n) for c, n in answer}
        for submission in watched:
            status, worker = states.get(submission.job_id, (None, None))
            if status is None:
                why = "no longer exists in Redis (deleted, or expired by its ttl)"
            elif status == b"started" and worker and listening.get(worker.decode(), 1) == 0:
                why = (f"was started by RQ worker {worker.decode()!r}, which is gone (nothing listens on its "
                       f"command channel rq:pubsub:{worker.decode()} any more): the worker process died")
            elif status == b"canceled":
                why = "was canceled in RQ by someone else"
            else:
                submission.strikes = 0
                continue
            submission.strikes += 1
            if submission.strikes >= LIVENESS_STRIKES:
                self._forget(submission)
                self._schedule(self._lost(submission, why, redeliverable=status != b"canceled"))

    def _schedule(self, coro: Any) -> None:
        assert self._loop is not None
        try:
            future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        except RuntimeError:  # the loop is closed: nobody waits any more
            coro.close()
            return
        self._pending_calls.add(future)
        future.add_done_callback(self._pending_calls.discard)

    # -- outcomes (on the loop) --------------------------------------------------------
    def _what(self, submission: RQSubmission) -> str:
        return f"RQ job {submission.job_id!r} on {self._where}"

    async def _settle(self, submission: RQSubmission, status: Any) -> None:
        if not self.is_pending(submission.run_id):
            return
        await self.settle(submission.run_id, status, what=self._what(submission), grace=self._grace,
                          attached=submission.attached)

    async def _failed(self, submission: RQSubmission, kind: str, exc_string: str) -> None:
        if submission.cancelled or await self.wait_for_terminal(submission.run_id, self._grace):
            return
        lines = [line for line in exc_string.strip().splitlines() if line.strip()]
        detail = lines[-1].strip() if lines else kind.lower()
        timed_out = "JobTimeoutException" in exc_string
        hint = (" (RQ's job_timeout, 180 s by default, ended it: raise enqueue_options.job_timeout)"
                if timed_out else "; the work horse running it died or was killed" if "Work-horse" in exc_string
                else "")
        await self._lost(submission, f"failed before its worker reported an outcome: {detail}{hint}",
                         redeliverable=not timed_out)

    async def _lost(self, submission: RQSubmission, why: str, *, redeliverable: bool = True) -> None:
        if self.is_pending(submission.run_id) and not submission.cancelled:
            self.report_lost(submission.run_id, f"rq executor: {self._what(submission)} {why}.",
                             redeliverable=redeliverable)

    async def close(self) -> None:
        """Stop the watcher and the adapter's thread; close the Redis connection it opened."""
        self._stopping.set()
        self._wake.set()
        if self._watcher is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._watcher.join, 5.0)
            self._watcher = None
        for future in list(self._pending_calls):
            future.cancel()
        with self._lock:
            self._submissions.clear()
        if self._thread is not None:
            self._thread.shutdown(wait=False)
            self._thread = None
        if self._owns_connection and self._connection is not None:
            self._connection.close()
        self._connection = self._queue = None
        self._owns_connection = False

