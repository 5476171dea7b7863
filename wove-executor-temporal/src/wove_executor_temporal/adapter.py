"""TemporalAdapter: runs Wove payloads as Temporal workflows.

``temporalio`` is imported in :meth:`TemporalAdapter.start`, never at import time.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from wove.backend import BackendAdapter
from wove.options import (
    CALLBACK_OPTIONS,
    DICT,
    INVALID,
    NON_NEGATIVE_SECONDS,
    POSITIVE_SECONDS,
    STR,
    Kind,
    Option,
    OptionSpec,
)

from ._names import DEFAULT_HEARTBEAT_TIMEOUT, DEFAULT_START_TO_CLOSE_TIMEOUT, WORKFLOW_NAME

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_TARGET_HOST",
    "TEMPORAL_OPTIONS",
    "TemporalAdapter",
    "TemporalSubmission",
    "workflow_id",
]

logger = logging.getLogger(__name__)

#: Where the adapter connects without ``client`` or ``target_host`` (the Temporal CLI's default).
DEFAULT_TARGET_HOST = "127.0.0.1:7233"
#: Seconds to reach the Temporal server at start.
DEFAULT_CONNECT_TIMEOUT = 10.0
#: Seconds a failed workflow waits for the worker's own terminal callback before the run
#: is declared lost (the callback and the failure race).
DEFAULT_LOSS_GRACE_SECONDS = 1.0
#: Seconds a workflow's next step may wait for a worker before the run is declared lost.
DEFAULT_NO_WORKER_TIMEOUT = 60.0
#: Workflows described per check for a missing worker (the longest unchecked first).
MAX_DESCRIBES_PER_CHECK = 32
#: Failed attempts of a workflow task after which the workers are deemed unable to run it.
MAX_WORKFLOW_TASK_ATTEMPTS = 3
#: Seconds to wait for the server to terminate a workflow declared lost.
TERMINATE_TIMEOUT = 5.0
#: ``start_workflow`` arguments Wove sets itself.
_RESERVED_START_OPTIONS = ("id", "task_queue", "args", "arg", "id_reuse_policy", "id_conflict_policy")
#: The memo entry naming the run that started a workflow (an idempotency-keyed workflow may
#: be shared by several runs: only its owner cancels it).
MEMO_RUN_ID = "wove_run_id"


def _start_options(value: Any) -> Any:
    if not isinstance(value, dict):
        return INVALID
    for reserved in _RESERVED_START_OPTIONS:
        if reserved in value:
            raise ValueError(f"it may not set {reserved!r}: Wove sets the workflow id, task queue, argument and "
                             "id policies itself (use workflow_id_prefix, task_queue and delivery_idempotency_key)")
    return value


def _client(value: Any) -> Any:
    from temporalio.client import Client

    return value if isinstance(value, Client) else INVALID


def _workflow(value: Any) -> Any:
    if isinstance(value, str):
        if not value:
            raise ValueError("the workflow name is empty")
        return value
    if callable(value) or isinstance(value, type):
        return value  # a workflow class's run method (Wove 2.x: WovePayloadWorkflow.run) or the class
    return INVALID


#: The temporal executor's ``executor_config`` keys (see :mod:`wove.options`), the backend
#: callback and re-delivery keys included.
TEMPORAL_OPTIONS = OptionSpec("temporal", [
    Option("client", Kind("a connected temporalio.client.Client", _client),
           doc="an existing Temporal client (instead of target_host)"),
    Option("target_host", STR, DEFAULT_TARGET_HOST, "Temporal frontend host:port the adapter connects to"),
    Option("connect_options", DICT, doc="more keyword arguments for temporalio.client.Client.connect (namespace...)"),
    Option("workflow", Kind("a workflow type name, or a workflow class or its run method", _workflow),
           WORKFLOW_NAME, "the workflow started with each payload"),
    Option("task_queue", STR, "wove", "the task queue the Wove workers poll"),
    Option("workflow_id_prefix", STR, "wove", "prefix of the workflow ids: <prefix>-<run id or idempotency key>"),
    Option("start_options", Kind("a dict of client.start_workflow keyword arguments", _start_options),
           doc="more client.start_workflow keyword arguments (execution_timeout, memo, search attributes...)"),
    Option("activity_heartbeat_timeout", POSITIVE_SECONDS, DEFAULT_HEARTBEAT_TIMEOUT,
           "seconds without a heartbeat after which Temporal declares the activity (its worker) lost"),
    Option("activity_timeout", POSITIVE_SECONDS, DEFAULT_START_TO_CLOSE_TIMEOUT,
           "seconds one run's activity may take at most (its start-to-close timeout)"),
    Option("no_worker_timeout", POSITIVE_SECONDS, DEFAULT_NO_WORKER_TIMEOUT,
           "seconds a workflow's next step may wait for a worker to pick it up before the run is lost"),
    Option("connect_timeout", POSITIVE_SECONDS, DEFAULT_CONNECT_TIMEOUT, "seconds to reach the Temporal server"),
    Option("loss_grace_seconds", NON_NEGATIVE_SECONDS, DEFAULT_LOSS_GRACE_SECONDS,
           "how long a failed workflow waits for the worker's own terminal callback"),
    CALLBACK_OPTIONS,
])


def workflow_id(prefix: str, run_id: str, key: str | None = None, attempt: int = 1) -> str:
    """The workflow id of a delivery: ``<prefix>-<key>`` for an idempotency-keyed run, else
    ``<prefix>-<run_id>`` (Wove 2.x's id), ``#<attempt>`` appended from the second delivery."""
    if key is not None:
        return f"{prefix}-{key}"
    return f"{prefix}-{run_id}" if attempt <= 1 else f"{prefix}-{run_id}#{attempt}"


def _cause_chain(exc: BaseException) -> str:
    """``WorkflowFailureError`` -> ``ActivityError`` -> ``TimeoutError(HEARTBEAT)`` as one phrase."""
    parts: list[str] = []
    current: BaseException | None = exc
    while current is not None and len(parts) < 6:
        kind = getattr(current, "type", None)
        text = str(current) or type(current).__name__
        if kind is not None and getattr(kind, "name", None):
            text += f" ({kind.name.lower()})"
        parts.append(f"{type(current).__name__}: {text}")
        current = current.__cause__
    return " <- ".join(parts)


def _explain(exc: BaseException) -> str:
    """What a workflow failure most likely means, for the run's error message."""
    from temporalio.exceptions import (
        ActivityError,
        CancelledError,
        TerminatedError,
        TimeoutError,
        TimeoutType,
    )

    cause = getattr(exc, "cause", None) or exc.__cause__ or exc
    inner = cause.__cause__ if isinstance(cause, ActivityError) else None
    if isinstance(inner, TimeoutError) and inner.type == TimeoutType.HEARTBEAT:
        return ("its activity stopped heartbeating (activity_heartbeat_timeout): the worker running it died or lost "
                "the server")
    if isinstance(inner, TimeoutError) and inner.type == TimeoutType.START_TO_CLOSE:
        return "its activity ran longer than executor_config.activity_timeout"
    if isinstance(inner, TimeoutError):
        return "its activity timed out"
    if isinstance(cause, ActivityError):
        return "its activity failed"
    if isinstance(cause, TerminatedError):
        return "the workflow was terminated"
    if isinstance(cause, CancelledError):
        return "the workflow was cancelled outside this executor"
    if isinstance(cause, TimeoutError):
        return "the workflow timed out (start_options execution/run timeout)"
    return "the workflow failed"



@dataclass(eq=False)
class TemporalSubmission:
    """One workflow of a run (a re-delivery gets a new one)."""

    run_id: str
    task_id: str
    workflow_id: str
    handle: Any
    keyed: bool = False
    watcher: asyncio.Task[None] | None = None
    cancelled: bool = False
    #: loop times: when it was submitted, when its workflow was last described
    submitted_at: float = 0.0
    checked_at: float = 0.0


class TemporalAdapter(BackendAdapter):
    """Runs each payload as a Temporal workflow (:data:`~wove_executor_temporal.workflow.WORKFLOW_NAME`).

    ``executor_config`` keys (:data:`TEMPORAL_OPTIONS`; Wove 2.x's keys first):

    * ``client``: an existing connected ``temporalio.client.Client`` (not closed by Wove),
      or ``target_host`` (default ``127.0.0.1:7233``) with ``connect_options`` (keyword
      arguments of ``Client.connect``: ``namespace``, ``tls``, ``api_key``...).
    * ``workflow`` (default ``"WovePayloadWorkflow"``, the workflow the Wove worker
      hosts), ``task_queue`` (default ``"wove"``), ``workflow_id_prefix`` (default
      ``"wove"``), ``start_options`` (more ``start_workflow`` keyword arguments).
    * ``activity_heartbeat_timeout`` (default 10 s): Temporal's bound on noticing a dead
      worker; ``activity_timeout`` (default a day): the most one run may take.
    * ``connect_timeout`` (default 10 s), ``loss_grace_seconds`` (default 1 s).
    * the backend callback and re-delivery keys (:data:`wove.options.CALLBACK_OPTIONS`).

    The workflow id is ``<prefix>-<run_id>``, or ``<prefix>-<delivery_idempotency_key>``
    for a keyed run: a second submission with that key attaches to the running workflow
    or gets the finished one's outcome (Temporal's id policies), so the task runs once.
    """

    required_modules = ("temporalio",)
    install_hint = "wove-executor-temporal"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._client: Any = None
        self._options: dict[str, Any] = {}
        self._submissions: dict[str, TemporalSubmission] = {}
        self._target = DEFAULT_TARGET_HOST
        self._closing = False
        self._monitor: asyncio.Task[None] | None = None

    @property
    def client(self) -> Any:
        """The ``temporalio.client.Client`` (None before start)."""
        return self._client

    async def start(self) -> None:
        """Validate the config and connect to the Temporal server (or take ``client``).

        Raises:
            ConfigError: an unknown ``executor_config`` key (with a did-you-mean) or a bad
                value (the key, the value and what is expected).
            OSError: the server cannot be reached within ``connect_timeout`` (names the
                address and the key).
        """
        options = TEMPORAL_OPTIONS.validate(self.config)
        self._options = options
        self._closing = False
        if options["client"] is not None:
            self._client = options["client"]
            config = getattr(getattr(self._client, "service_client", None), "config", None)
            self._target = str(getattr(config, "target_host", None) or "the given client's server")
            self._monitor = asyncio.ensure_future(self._watch_workers())
            return
        from temporalio.client import Client

        self._target = options["target_host"]
        timeout = float(options["connect_timeout"])
        connect = dict(options["connect_options"] or {})
        try:
            self._client = await asyncio.wait_for(Client.connect(self._target, **connect), timeout)
        except (Exception, asyncio.TimeoutError) as exc:
            if isinstance(exc, TypeError):
                raise
            raise OSError(
                f"temporal executor cannot connect to the Temporal server at {self._target} within "
                f"executor_config.connect_timeout={timeout:g} s: {type(exc).__name__}: {exc}. Check "
                "executor_config.target_host (and connect_options) and that the server runs (for development: "
                "temporal server start-dev)."
            ) from exc
        self._monitor = asyncio.ensure_future(self._watch_workers())

    async def submit(self, payload: dict[str, Any], frame: dict[str, Any]) -> TemporalSubmission:
        """Start the run's workflow (``start_workflow(workflow, payload, id=..., task_queue=...)``).

        Raises:
            temporalio.service.RPCError: the server refused the start (the run then ends
                with a transport error naming it).
        """
        from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
        from temporalio.exceptions import WorkflowAlreadyStartedError

        options = self._options
        run_id, task_id = str(payload["run_id"]), str(payload["task_id"])
        delivery = frame.get("delivery") or {}
        key = delivery.get("delivery_idempotency_key")
        key = key if isinstance(key, str) else None
        attempt = int(payload.get("attempt") or 1)
        wid = workflow_id(options["workflow_id_prefix"], run_id, key, attempt)
        payload = {**payload, "temporal_activity": {
            "heartbeat_timeout": float(options["activity_heartbeat_timeout"]),
            "start_to_close_timeout": float(options["activity_timeout"]),
        }}
        start: dict[str, Any] = dict(options["start_options"] or {})
        if key is not None:
            # A duplicate gets the first execution's outcome from the workflow result: the payload
            # of a keyed run asks the worker to keep it there (keep_outcome).
            start["id_reuse_policy"] = WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY
            # a re-delivery replaces the execution it declared lost; a duplicate joins the running one
            start["id_conflict_policy"] = (WorkflowIDConflictPolicy.USE_EXISTING if attempt <= 1
                                           else WorkflowIDConflictPolicy.TERMINATE_EXISTING)
            start["memo"] = {**dict(start.get("memo") or {}), MEMO_RUN_ID: run_id}
        try:
            handle = await self._client.start_workflow(options["workflow"], payload, id=wid,
                                                       task_queue=options["task_queue"], **start)
        except WorkflowAlreadyStartedError:
            if key is None:
                raise
            # finished successfully before: its outcome (kept for the namespace's retention) is this run's
            handle = self._client.get_workflow_handle(wid)
        now = asyncio.get_running_loop().time()
        submission = TemporalSubmission(run_id=run_id, task_id=task_id, workflow_id=wid, handle=handle,
                                        keyed=key is not None, submitted_at=now, checked_at=now)
        submission.watcher = asyncio.ensure_future(self._watch(submission))
        self._submissions[run_id] = submission
        return submission

    async def cancel(self, run_id: str, submission: Any, frame: dict[str, Any]) -> None:
        """Cancel the run's workflow; Temporal cancels its activity, which stops the run.

        A keyed run that joined another run's workflow leaves it running (its owner may
        still wait for it).
        """
        if not isinstance(submission, TemporalSubmission):
            return
        submission.cancelled = True
        if submission.keyed and not await self._owns(submission):
            return
        await submission.handle.cancel()

    async def _owns(self, submission: TemporalSubmission) -> bool:
        try:
            memo = await (await submission.handle.describe()).memo()
        except Exception as exc:
            logger.debug("temporal executor: describing workflow %s failed: %r", submission.workflow_id, exc)
            return False
        return bool(memo.get(MEMO_RUN_ID) == submission.run_id)

    async def _watch(self, submission: TemporalSubmission) -> None:
        try:
            await self._follow(submission)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug or a Temporal surprise: end the run rather than strand it
            logger.exception("temporal executor: watching workflow %r failed", submission.workflow_id)
            if not self._closing:
                self.report_lost(submission.run_id, f"temporal executor: watching Temporal workflow "
                                 f"{submission.workflow_id!r} on {self._target} failed: {type(exc).__name__}: {exc}",
                                 exc)
        finally:
            if self._submissions.get(submission.run_id) is submission:
                del self._submissions[submission.run_id]

    async def _follow(self, submission: TemporalSubmission) -> None:
        from temporalio.client import WorkflowFailureError
        from temporalio.service import RPCError

        what = f"Temporal workflow {submission.workflow_id!r}"
        try:
            status = await submission.handle.result()
        except WorkflowFailureError as exc:
            if submission.cancelled or await self.wait_for_terminal(submission.run_id,
                                                                    self._options["loss_grace_seconds"]):
                return
            self.report_lost(
                submission.run_id,
                f"temporal executor: {what} on task queue {self._options['task_queue']!r} at {self._target} ended "
                f"before its worker reported the run's outcome: {_explain(exc)} ({_cause_chain(exc.cause)}).",
                exc,
            )
            return
        except RPCError as exc:
            if submission.cancelled or self._closing:
                return
            self.report_lost(submission.run_id, f"temporal executor: following {what} on the Temporal server at "
                             f"{self._target} failed: {type(exc).__name__}: {exc}; the server is down or "
                             "unreachable.", exc)
            return
        if submission.cancelled:
            return
        await self.settle(submission.run_id, status, what=what, attached=submission.keyed)

    # -- workers gone ---------------------------------------------------------------------
    async def _watch_workers(self) -> None:
        """Declare runs lost whose workflow no worker picks up (every worker of the task queue
        is gone, or none runs the workflow): Temporal itself would wait for one forever."""
        timeout = float(self._options["no_worker_timeout"])
        interval = min(max(timeout / 4.0, 0.2), 5.0)
        loop = asyncio.get_running_loop()
        while not self._closing:
            await asyncio.sleep(interval)
            now = loop.time()
            due = [s for s in self._submissions.values()
                   if not s.cancelled and now - s.submitted_at >= timeout and now - s.checked_at >= interval]
            due.sort(key=lambda s: s.checked_at)
            try:
                await asyncio.gather(*(self._check_worker(s, timeout) for s in due[:MAX_DESCRIBES_PER_CHECK]))
            except asyncio.CancelledError:
                raise
            except Exception:  # never stop watching: say so and go on
                logger.exception("temporal executor: checking for a missing worker failed")

    async def _check_worker(self, submission: TemporalSubmission, timeout: float) -> None:
        import datetime

        from temporalio.api.enums.v1 import PendingWorkflowTaskState

        submission.checked_at = asyncio.get_running_loop().time()
        try:
            raw = (await submission.handle.describe()).raw_description
        except Exception as exc:  # the server is away: the watcher reports that
            logger.debug("temporal executor: describing workflow %s failed: %r", submission.workflow_id, exc)
            return
        if submission.cancelled or not self.is_pending(submission.run_id) or not raw.HasField("pending_workflow_task"):
            return
        task = raw.pending_workflow_task
        queue = self._options["task_queue"]
        what = f"temporal executor: Temporal workflow {submission.workflow_id!r} on task queue {queue!r} at {self._target}"
        if task.attempt >= MAX_WORKFLOW_TASK_ATTEMPTS:
            reason = (f"{what}: its workflow task failed {task.attempt - 1} times on the workers, which cannot run "
                      f"workflow {self._options['workflow']!r} (do they run python -m wove_executor_temporal.worker, "
                      "or register WovePayloadWorkflow and PayloadActivity? see the worker's log)")
            redeliverable = False
        elif task.state == PendingWorkflowTaskState.PENDING_WORKFLOW_TASK_STATE_SCHEDULED:
            scheduled = task.original_scheduled_time.ToDatetime(tzinfo=datetime.timezone.utc)
            waited = (datetime.datetime.now(datetime.timezone.utc) - scheduled).total_seconds()
            if waited < timeout:
                return
            reason = (f"{what}: no worker picked up its next step for {waited:.0f} s "
                      f"(executor_config.no_worker_timeout={timeout:g}); every worker polling {queue!r} is gone. "
                      f"Start one: python -m wove_executor_temporal.worker --target-host {self._target} "
                      f"--task-queue {queue}")
            redeliverable = True
        else:
            return
        submission.cancelled = True  # its workflow ends here: the watcher need not report it
        try:  # first: a worker coming back must not run it after all (a re-delivery will)
            await asyncio.wait_for(submission.handle.terminate(reason="Wove declared the run lost: " + reason[:400]),
                                   TERMINATE_TIMEOUT)
        except Exception as exc:
            logger.warning("temporal executor: terminating workflow %s failed: %r", submission.workflow_id, exc)
        self.report_lost(submission.run_id, reason + ".", redeliverable=redeliverable)

    async def close(self) -> None:
        """Stop watching the workflows (they keep running on Temporal; cancelled runs were
        cancelled by the runtime already)."""
        self._closing = True
        if self._monitor is not None:
            self._monitor.cancel()
            await asyncio.gather(self._monitor, return_exceptions=True)
            self._monitor = None
        watchers = [s.watcher for s in self._submissions.values() if s.watcher is not None]
        for watcher in watchers:
            watcher.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        self._submissions.clear()
        self._client = None
