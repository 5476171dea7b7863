"""RayAdapter: runs Wove payloads as Ray tasks and takes their outcome from the ObjectRef.

``ray`` is imported in :meth:`RayAdapter.start`, never at import time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
from dataclasses import dataclass
from typing import Any

from wove.backend import BackendAdapter
from wove.errors import ConfigError
from wove.options import (
    BOOL,
    CALLBACK_OPTIONS,
    DICT,
    INVALID,
    NON_NEGATIVE_SECONDS,
    POSITIVE_INT,
    POSITIVE_SECONDS,
    STR,
    Kind,
    Option,
    OptionSpec,
)

from . import _worker

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_LOSS_GRACE_SECONDS",
    "LEDGER_NAME",
    "RAY_OPTIONS",
    "RayAdapter",
    "RaySubmission",
]

logger = logging.getLogger(__name__)

#: Seconds a failed ObjectRef waits for the worker's own terminal callback before the run
#: is declared lost (the worker may have posted its outcome just before it died).
DEFAULT_LOSS_GRACE_SECONDS = 1.0
#: Seconds to reach the Ray head (GCS) of ``address`` before ``ray.init`` is even tried.
DEFAULT_CONNECT_TIMEOUT = 10.0
#: Seconds to reach the head's GCS port when checking that the cluster is still there.
HEAD_CHECK_SECONDS = 2.0
#: Seconds between those checks while runs are pending (and after every failed Ray task).
HEAD_WATCH_SECONDS = 3.0
#: The name of the idempotency ledger actor (in namespace ``idempotency_namespace``).
LEDGER_NAME = "wove-idempotency"
#: ``remote_options`` the adapter decides itself.
_RESERVED_REMOTE_OPTIONS = {
    "num_returns": "a Wove task returns exactly one value (its status)",
    "max_retries": "Wove sets max_retries=0 so that delivery_orphan_policy decides what happens to a run whose "
                   "worker died (requeue re-delivers it, bounded by max_deliveries)",
    "retry_exceptions": "the Ray task never raises for a task's own exception (it travels in the outcome)",
    "_generator_backpressure_num_objects": "a Wove task is not a Ray generator",
}


def _remote_options(value: Any) -> Any:
    if not isinstance(value, dict):
        return INVALID
    for name, why in _RESERVED_REMOTE_OPTIONS.items():
        if name in value:
            raise ValueError(f"it may not set {name!r}: {why}")
    return value


#: The ray executor's ``executor_config`` keys: Wove 2.x's (``address``, ``init``,
#: ``init_options``, ``remote_options``, ``force_cancel``), this adapter's own, and the
#: backend callback and re-delivery keys.
RAY_OPTIONS = OptionSpec("ray", [
    Option("address", STR, doc="the Ray cluster to connect to (host:port of the head's GCS, 'auto', or "
                               "ray://host:10001); without it ray.init() starts or finds a local Ray"),
    Option("init", BOOL, True, "call ray.init() when Ray is not initialized in this process (false: the "
                               "program calls ray.init itself, before the environment starts)"),
    Option("init_options", DICT, doc="more keyword arguments for ray.init (num_cpus, runtime_env, namespace...)"),
    Option("remote_options", Kind("a dict of Ray task options", _remote_options),
           doc="options of the Ray task (num_cpus, resources, runtime_env, scheduling_strategy...; not "
               "num_returns/max_retries/retry_exceptions)"),
    Option("force_cancel", BOOL, False, "cancel with ray.cancel(force=True): kill the worker process running "
                                        "the task, so a sync task really stops"),
    Option("connect_timeout", POSITIVE_SECONDS, DEFAULT_CONNECT_TIMEOUT,
           "seconds to reach the head at 'address' (a TCP check before ray.init)"),
    Option("loss_grace_seconds", NON_NEGATIVE_SECONDS, DEFAULT_LOSS_GRACE_SECONDS,
           "how long a failed Ray task waits for the worker's own terminal callback"),
    Option("idempotency_namespace", STR, "wove",
           "Ray namespace of the idempotency ledger actor (runs sharing a delivery_idempotency_key are "
           "deduplicated across every executor using the same namespace on the cluster)"),
    Option("idempotency_ttl", POSITIVE_SECONDS, 600.0,
           "seconds a finished keyed run's outcome is handed to later submissions with its key"),
    Option("idempotency_cache_size", POSITIVE_INT, 1024, "finished keyed runs the ledger keeps, at most"),
    CALLBACK_OPTIONS,
])


class _Connection:
    """This process's Ray connection, shared by every ray executor in it.

    ``ray.init`` connects a process to one cluster. The first adapter that needed to call
    it owns the connection; the last adapter to close shuts down what Wove opened.
    """

    lock = threading.Lock()
    users = 0
    owned = False


@dataclass(eq=False)
class RaySubmission:
    """One Ray task of a run (a re-delivery gets a new one).

    ``shared`` is True when the run's ``delivery_idempotency_key`` named a task another
    submission started (its outcome is handed to this run as well).
    """

    run_id: str
    task_id: str
    ref: Any
    key: str | None = None
    shared: bool = False
    cancelled: bool = False
    watcher: asyncio.Task[None] | None = None

    @property
    def ray_task_id(self) -> str:
        """The Ray task id (hex)."""
        try:
            return str(self.ref.task_id().hex())
        except Exception:  # pragma: no cover - an unusual ObjectRef
            return repr(self.ref)


def _split_host_port(address: str) -> tuple[str, int] | None:
    target = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def _answers(address: str, timeout: float) -> bool:
    """True when something accepts TCP connections at ``address`` (or it is not host:port)."""
    where = _split_host_port(address)
    if where is None:
        return True
    try:
        socket.create_connection(where, timeout=timeout).close()
    except OSError:
        return False
    return True


def _check_reachable(address: str, timeout: float) -> None:
    where = _split_host_port(address)
    if where is None:
        return  # "auto", "local", a name Ray resolves itself
    try:
        socket.create_connection(where, timeout=timeout).close()
    except OSError as exc:
        raise OSError(
            f"ray executor cannot reach the Ray head at {address} within executor_config.connect_timeout="
            f"{timeout:g} s: {type(exc).__name__}: {exc}. Check executor_config.address (the head's GCS "
            "address, as `ray start --head` prints it, or ray://host:10001 for Ray Client) and that the head is "
            "running and reachable from here."
        ) from exc


class _QuietSigtermWarning(logging.Filter):
    """ray.init off the main thread warns that it set no SIGTERM handler: expected here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


def _connect(init: bool, init_kwargs: dict[str, Any], address: str | None, timeout: float) -> str:
    """Initialize Ray (or check the existing connection); count this adapter as a user.

    Runs in a thread: ``ray.init`` blocks for seconds.
    """
    import ray

    with _Connection.lock:
        if ray.is_initialized():
            current = _gcs_address(address)
            if address and _split_host_port(address) and "://" not in address and \
                    _split_host_port(address) != _split_host_port(current):
                raise ConfigError(
                    f"ray executor: Ray is already initialized in this process, connected to the cluster at "
                    f"{current}, but executor_config.address is {address!r}. One process connects to one Ray "
                    "cluster: give every ray environment of this program the same address (or none)."
                )
        else:
            if not init:
                raise RuntimeError(
                    "ray executor: Ray is not initialized in this process and executor_config.init is false. Call "
                    "ray.init(...) before the environment starts, or set executor_config.init to true."
                )
            if address:
                _check_reachable(address, timeout)
                init_kwargs["address"] = address
            init_kwargs.setdefault("ignore_reinit_error", True)
            quiet = _QuietSigtermWarning()
            ray_logger = logging.getLogger("ray._private.worker")
            ray_logger.addFilter(quiet)
            try:
                ray.init(**init_kwargs)
            finally:
                ray_logger.removeFilter(quiet)
            _Connection.owned = True
        _Connection.users += 1
        return _gcs_address(address)


def _gcs_address(default: str | None) -> str:
    """The GCS address of this process's Ray connection (``default`` where Ray cannot tell,
    as with Ray Client)."""
    import ray

    try:
        return str(ray.get_runtime_context().gcs_address)
    except Exception:
        return default or "?"


def _disconnect() -> None:
    import ray

    with _Connection.lock:
        _Connection.users = max(0, _Connection.users - 1)
        if _Connection.users == 0 and _Connection.owned:
            _Connection.owned = False
            ray.shutdown()


def _for_run(status: Any, run_id: str, task_id: str) -> Any:
    """The status of a shared task, addressed to another run sharing its idempotency key."""
    if not (isinstance(status, dict) and status.get("posted") is False):
        return status
    encoded = status.get("event")
    if isinstance(encoded, bytes):
        encoded = encoded.decode("utf-8")
    if not isinstance(encoded, str):
        return status
    try:
        event = json.loads(encoded)  # JSON only: the result stays pickled inside
    except ValueError:
        return status
    if not isinstance(event, dict):
        return status
    event.update(run_id=run_id, task_id=task_id)
    return {**status, "run_id": run_id, "event": json.dumps(event, separators=(",", ":"))}


class RayAdapter(BackendAdapter):
    """Runs each payload as one Ray task; the outcome comes back through its ObjectRef.

    The Ray task (:func:`wove_executor_ray._worker.run_payload`, shipped by value) runs the
    payload through the one worker engine and returns its status: the run's events go to
    the callback server while it is reachable, and the terminal event travels in the
    ObjectRef when it is not (``result_channel``). The adapter awaits every ObjectRef and
    settles the run from it; a Ray task that fails (its worker process died or was
    killed, the node died, Ray ran out of memory) is reported lost, so the run's
    ``delivery_orphan_policy`` decides (Wove sets ``max_retries=0``: Ray never re-runs a
    Wove task behind Wove's back).

    See :data:`RAY_OPTIONS` for the ``executor_config`` keys.
    """

    required_modules = ("ray",)
    install_hint = "wove-executor-ray"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._options: dict[str, Any] = {}
        self._remote: Any = None
        self._remote_options: dict[str, Any] = {}
        self._submissions: dict[str, RaySubmission] = {}
        self._ledger: Any = None
        self._ledger_lock = asyncio.Lock()
        self._connected = False
        self._address = "?"
        self._grace = DEFAULT_LOSS_GRACE_SECONDS
        self._force = False
        #: Why the cluster is unusable (set once its head stopped answering).
        self._gone: str | None = None
        self._monitor: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        """The GCS address of the cluster this process is connected to (after start)."""
        return self._address

    async def start(self) -> None:
        """Connect this process to Ray (``ray.init`` in a thread, when needed).

        Raises:
            ConfigError: an unknown ``executor_config`` key (with a did-you-mean) or a bad
                value, or an ``address`` other than the cluster this process is already
                connected to.
            OSError: nothing answers at ``address`` within ``connect_timeout``.
            RuntimeError: ``init`` is false and Ray is not initialized.
        """
        options = RAY_OPTIONS.validate(self.config)
        import ray
        from ray import cloudpickle

        # Ship the worker-side code by value: Ray workers need wove-backend (or Wove 2.x),
        # not this distribution.
        cloudpickle.register_pickle_by_value(_worker)
        self._options = options
        self._grace = float(options["loss_grace_seconds"])
        self._force = bool(options["force_cancel"])
        init_kwargs = dict(options["init_options"] or {})
        address = options["address"]
        if address is not None and init_kwargs.get("address") not in (None, address):
            raise ConfigError(f"ray executor: executor_config.address is {address!r} but "
                              f"executor_config.init_options.address is {init_kwargs['address']!r}; set only one.")
        address = address or init_kwargs.pop("address", None)
        self._address = await asyncio.to_thread(_connect, bool(options["init"]), init_kwargs, address,
                                                float(options["connect_timeout"]))
        self._connected = True
        self._remote_options = {**dict(options["remote_options"] or {}), "max_retries": 0}
        self._remote = ray.remote(_worker.run_payload).options(**self._remote_options)
        self._monitor = asyncio.ensure_future(self._watch_head())

    async def _watch_head(self) -> None:
        """While runs are pending, check every few seconds that the head still answers.

        A task queued in this process (no worker leased yet) does not fail when the head
        dies: Ray keeps it until it gives up on the head itself. Without this watch such
        a run would wait for that; with it, every pending run ends naming the head.
        """
        try:
            while True:
                await asyncio.sleep(HEAD_WATCH_SECONDS)
                if self._submissions and not await asyncio.to_thread(_answers, self._address, HEAD_CHECK_SECONDS):
                    self._head_gone()
                    return
        except asyncio.CancelledError:
            raise
        except Exception:  # never die silently
            logger.exception("ray executor: watching the Ray head at %s failed", self._address)

    def _head_gone(self) -> None:
        if self._gone is None:
            self._gone = (
                f"ray executor: the head of the Ray cluster at {self._address} no longer answers: the cluster is gone "
                "(its head node died or was stopped), so runs submitted to it cannot finish. Ray itself ends this "
                "process when the head stays unreachable for gcs_rpc_server_reconnect_timeout_s (60 s by default). "
                "Restart the cluster, then the program."
            )
            logger.error("%s", self._gone)
        for submission in list(self._submissions.values()):
            if self.is_pending(submission.run_id) and not submission.cancelled:
                self.report_lost(submission.run_id, self._lost_with_head(submission), None, redeliverable=False)
            if submission.watcher is not None:
                submission.watcher.cancel()

    def _lost_with_head(self, submission: RaySubmission) -> str:
        return f"{self._gone} Run {submission.run_id} was Ray task {submission.ray_task_id}."

    # -- submitting ----------------------------------------------------------------------
    async def submit(self, payload: dict[str, Any], frame: dict[str, Any]) -> RaySubmission:
        """Submit ``payload`` as a Ray task (through the idempotency ledger when it has a key)."""
        if self._gone is not None:
            raise RuntimeError(self._gone)
        run_id, task_id = str(payload["run_id"]), str(payload["task_id"])
        delivery = payload.get("delivery")
        key = delivery.get("delivery_idempotency_key") if isinstance(delivery, dict) else None
        if isinstance(key, str):
            submission = await self._submit_keyed(key, payload, run_id, task_id)
        else:
            submission = RaySubmission(run_id=run_id, task_id=task_id, ref=self._remote.remote(payload))
        submission.watcher = asyncio.ensure_future(self._watch(submission, delivery))
        self._submissions[run_id] = submission
        return submission

    async def _submit_keyed(self, key: str, payload: dict[str, Any], run_id: str, task_id: str) -> RaySubmission:
        import ray

        # Every submission sharing the key takes the outcome from the shared ObjectRef, so the
        # task returns its terminal event there (it still posts task_started and heartbeats).
        keyed = {**payload, "result_channel": "engine"}
        args = (key, keyed, self._remote_options, float(self._options["idempotency_ttl"]),
                int(self._options["idempotency_cache_size"]))
        for attempt in (1, 2):
            ledger = await self._get_ledger()
            try:
                refs, fresh = await ledger.submit.remote(*args)
                break
            except ray.exceptions.RayActorError:
                self._ledger = None  # it died: the next attempt finds (or makes) a new one
                if attempt == 2:
                    raise
        return RaySubmission(run_id=run_id, task_id=task_id, ref=refs[0], key=key, shared=not fresh)

    async def _get_ledger(self) -> Any:
        async with self._ledger_lock:
            if self._ledger is None:
                import ray

                actor = ray.remote(_worker.IdempotencyLedger).options(
                    name=LEDGER_NAME, namespace=str(self._options["idempotency_namespace"]),
                    lifetime="detached", get_if_exists=True, num_cpus=0, max_concurrency=1000, max_restarts=0,
                )
                self._ledger = await asyncio.to_thread(actor.remote)
            return self._ledger

    async def cancel(self, run_id: str, submission: Any, frame: dict[str, Any]) -> None:
        """``ray.cancel`` the run's task (``force`` with ``force_cancel``).

        A task started through the idempotency ledger is cancelled by the ledger (which
        owns it); every submission sharing its key then loses the run.
        """
        if not isinstance(submission, RaySubmission):
            return
        import ray

        submission.cancelled = True
        if submission.key is not None and self._ledger is not None:
            await self._ledger.cancel.remote(submission.key, submission.ray_task_id, self._force)
        else:
            ray.cancel(submission.ref, force=self._force)

    # -- watching ------------------------------------------------------------------------
    async def _watch(self, submission: RaySubmission, delivery: Any) -> None:
        beats = asyncio.ensure_future(self._beat(submission, delivery)) if submission.shared else None
        try:
            await self._follow(submission)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug or a Ray surprise: end the run rather than strand it
            logger.exception("ray executor: watching Ray task %s of run %s failed", submission.ray_task_id,
                             submission.run_id)
            self.report_lost(submission.run_id, f"ray executor: watching Ray task {submission.ray_task_id} of run "
                             f"{submission.run_id} failed: {type(exc).__name__}: {exc}", exc)
        finally:
            if beats is not None:
                beats.cancel()
            if self._submissions.get(submission.run_id) is submission:
                del self._submissions[submission.run_id]

    async def _beat(self, submission: RaySubmission, delivery: Any) -> None:
        """Liveness for a run that shares another submission's task.

        The task posts its heartbeats to the submission that started it; this run's
        liveness is Ray's: its ObjectRef fails when the worker dies.
        """
        interval = delivery.get("delivery_heartbeat_seconds") if isinstance(delivery, dict) else None
        if not isinstance(interval, (int, float)) or isinstance(interval, bool) or interval <= 0:
            return
        event = {"run_id": submission.run_id, "task_id": submission.task_id}
        self.report_event({"type": "task_started", **event})
        while self.is_pending(submission.run_id):
            await asyncio.sleep(float(interval) / 3.0)
            self.report_event({"type": "heartbeat", **event})

    async def _follow(self, submission: RaySubmission) -> None:
        import ray.exceptions as rex

        what = f"the Ray task {submission.ray_task_id}"
        try:
            status = await submission.ref
        except rex.TaskCancelledError as exc:
            if submission.cancelled or not self.is_pending(submission.run_id):
                return
            await self._on_failure(submission, exc, "the Ray task was cancelled outside this environment "
                                   "(ray.cancel, or the cancellation of another submission sharing its "
                                   "delivery_idempotency_key)")
            return
        except rex.RayTaskError as exc:
            # The Wove task function itself raised (a bad payload, a worker without Wove):
            # deterministic, so a re-delivery would fail the same way.
            await self._on_failure(submission, exc, "the Ray task raised instead of returning the run's outcome",
                                   redeliverable=False)
            return
        except (rex.RuntimeEnvSetupError, rex.TaskUnschedulableError) as exc:
            await self._on_failure(submission, exc, "Ray could not run the task", redeliverable=False)
            return
        except rex.RayError as exc:
            await self._on_failure(submission, exc, "the Ray worker process running it died or was killed, or "
                                   "Ray lost the task")
            return
        if submission.shared:
            status = _for_run(status, submission.run_id, submission.task_id)
            what += f" (shared through delivery_idempotency_key {submission.key!r})"
        await self.settle(submission.run_id, status, what=what, grace=self._grace)

    async def _on_failure(self, submission: RaySubmission, exc: BaseException, what: str, *,
                          redeliverable: bool = True) -> None:
        if submission.cancelled or await self.wait_for_terminal(submission.run_id, self._grace):
            return
        if self._gone is None and not await asyncio.to_thread(_answers, self._address, HEAD_CHECK_SECONDS):
            self._head_gone()  # ends this run too
            return
        if self._gone is not None:
            self.report_lost(submission.run_id, self._lost_with_head(submission), exc, redeliverable=False)
            return
        if submission.key is not None and self._ledger is not None:
            try:  # before re-delivery: the key must not hand out the failed task again
                await self._ledger.forget.remote(submission.key, submission.ray_task_id)
            except Exception as forget_error:
                logger.debug("ray executor: dropping key %r from the ledger failed: %r", submission.key,
                             forget_error)
        detail = str(exc).strip()
        if len(detail) > 2000:
            detail = detail[:2000] + " [...]"
        self.report_lost(
            submission.run_id,
            f"ray executor: Ray task {submission.ray_task_id} of run {submission.run_id} on the Ray cluster at "
            f"{self._address} ended without the run's outcome: {what} ({type(exc).__name__}: {detail}). Wove "
            "submits its Ray tasks with max_retries=0, so the environment's delivery_orphan_policy decides: "
            "'requeue' delivers the run again (bounded by executor_config.max_deliveries).",
            exc, redeliverable=redeliverable,
        )

    async def close(self) -> None:
        """Stop watching; shut Ray down when this was the last user of a connection Wove opened."""
        if self._monitor is not None:
            self._monitor.cancel()
            await asyncio.gather(self._monitor, return_exceptions=True)
            self._monitor = None
        watchers = [s.watcher for s in self._submissions.values() if s.watcher is not None]
        for watcher in watchers:
            watcher.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        self._submissions.clear()
        self._ledger = None
        self._remote = None
        if self._connected:
            self._connected = False
            try:
                await asyncio.wait_for(asyncio.to_thread(_disconnect), 30)
            except Exception as exc:
                logger.warning("ray executor: ray.shutdown() failed: %r", exc)
