"""DaskAdapter: submits Wove payloads to a Dask distributed cluster.

``distributed`` is imported in :meth:`DaskAdapter.start`, never at import time.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from wove.backend import BackendAdapter
from wove.options import (
    BOOL,
    CALLBACK_OPTIONS,
    DICT,
    INVALID,
    NON_NEGATIVE_INT,
    NON_NEGATIVE_SECONDS,
    POSITIVE_INT,
    POSITIVE_SECONDS,
    STR,
    Kind,
    Option,
    OptionSpec,
)

from ._main_guard import MainGuardError, check_main_guard

__all__ = ["DASK_OPTIONS", "DEFAULT_CONNECT_TIMEOUT", "DaskAdapter", "DaskSubmission", "MainGuardError", "dask_key"]

logger = logging.getLogger(__name__)

#: Seconds a failed future waits for the worker's own terminal callback before the run
#: is declared lost (the callback and the failure race).
DEFAULT_LOSS_GRACE_SECONDS = 1.0
#: Seconds to reach the scheduler (Dask's own default is 30 s of silence); Dask also uses
#: it as the time to reconnect after the connection to the scheduler dropped.
DEFAULT_CONNECT_TIMEOUT = 5.0
#: Seconds between checks that the client still has its scheduler.
CLIENT_CHECK_SECONDS = 0.2
_RESERVED_SUBMIT_OPTIONS = ("key", "pure")


def _submit_options(value: Any) -> Any:
    if not isinstance(value, dict):
        return INVALID
    for reserved in _RESERVED_SUBMIT_OPTIONS:
        if reserved in value:
            raise ValueError(f"it may not set {reserved!r}: Wove keys each task by its run id")
    return value


def _async_client(value: Any) -> Any:
    return value if getattr(value, "asynchronous", False) else INVALID


#: The dask executor's ``executor_config`` keys (see :mod:`wove.options`), the backend
#: callback and re-delivery keys included.
DASK_OPTIONS = OptionSpec("dask", [
    Option("address", STR, doc="scheduler address (tcp://host:8786); without it an embedded LocalCluster starts"),
    Option("client", Kind("an asynchronous distributed.Client (Client(..., asynchronous=True)) on the runtime's "
                          "loop; or give 'address'", _async_client), doc="an existing asynchronous Client"),
    Option("n_workers", NON_NEGATIVE_INT, doc="workers of the embedded LocalCluster"),
    Option("threads_per_worker", POSITIVE_INT, doc="threads per worker of the embedded LocalCluster"),
    Option("processes", BOOL, True, "the embedded LocalCluster's workers are processes"),
    Option("cluster_options", DICT, doc="more LocalCluster keyword arguments"),
    Option("client_options", DICT, doc="keyword arguments for distributed.Client"),
    Option("submit_options", Kind("a dict of client.submit keyword arguments", _submit_options),
           doc="keyword arguments for client.submit (resources, priority, retries, workers...; not key/pure)"),
    Option("loss_grace_seconds", NON_NEGATIVE_SECONDS, DEFAULT_LOSS_GRACE_SECONDS,
           "how long a failed future waits for the worker's own terminal callback"),
    Option("connect_timeout", POSITIVE_SECONDS, DEFAULT_CONNECT_TIMEOUT,
           "seconds to reach the scheduler, and to reconnect after the connection dropped"),
    CALLBACK_OPTIONS,
])


async def _settled(future: Any) -> None:
    """Wait until a Dask future is no longer pending, without fetching its result.

    Uses the coroutine behind ``distributed.wait`` (which itself would go through the
    *default* client, perhaps not ours); a ``distributed`` without it makes this return at
    once, and the caller then fetches the result as it would anyway.
    """
    try:
        from distributed.client import _wait
    except ImportError:  # pragma: no cover - another distributed version
        return
    try:
        await _wait([future])
    except Exception:  # FuturesCancelledError: a cancelled future is settled too
        pass


def _address_of(client: Any, default: str) -> str:
    """The scheduler address of a connected client (read once: it is gone after close)."""
    try:
        return str(client.scheduler.address)
    except AttributeError:
        return default


def dask_key(task_id: str, run_id: str, attempt: int = 1) -> str:
    """The Dask key of a run's delivery: ``<task_id>-<run_id>`` (``#<attempt>`` from the second).

    ``dask.utils.key_split`` of it is the task id, so Dask groups runs by task.
    """
    key = f"{task_id}-{run_id}"
    return key if attempt <= 1 else f"{key}#{attempt}"


@dataclass(eq=False)
class DaskSubmission:
    """One Dask future of a run (a re-delivery gets a new one)."""

    run_id: str
    key: str
    future: Any
    watcher: asyncio.Task[None] | None = None
    cancelled: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class DaskAdapter(BackendAdapter):
    """Runs payloads as Dask tasks keyed by run id.

    ``executor_config`` keys:

    * ``address``: scheduler address (``tcp://host:8786``) of an existing cluster. Without
      it an embedded ``LocalCluster`` starts and stops with the environment, sized by
      ``n_workers``, ``threads_per_worker`` and ``processes`` (default True), with more
      ``LocalCluster`` arguments in ``cluster_options``.
    * ``client_options``: keyword arguments for ``distributed.Client``.
    * ``submit_options``: keyword arguments for ``client.submit`` (``resources``,
      ``priority``, ``retries``, ``workers``...; not ``key``/``pure``).
    * ``loss_grace_seconds`` (default 1.0): how long a failed future waits for the
      worker's own terminal callback before the run is declared lost.
    * ``connect_timeout`` (seconds, default 5): how long to try to reach the scheduler
      at start, and (Dask's client ``timeout``) to reconnect when the connection drops;
      ``client_options["timeout"]`` overrides it for the client.
    * ``client``: an existing asynchronous ``distributed.Client`` (instead of ``address``).
    * the backend callback and re-delivery keys (:data:`wove.options.CALLBACK_OPTIONS`).

    Any other key is a :class:`~wove.errors.ConfigError` at start, with a did-you-mean
    (:data:`DASK_OPTIONS`).

    When the client gives up reconnecting to its scheduler, every pending run ends with
    a ``task_error`` (source ``transport``) naming the scheduler, whatever its orphan
    policy, and later submissions fail the same way.
    """

    required_modules = ("distributed",)
    install_hint = "wove-executor-dask"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._client: Any = None
        self._cluster: Any = None
        self._owns_client = False
        self._submissions: dict[str, DaskSubmission] = {}
        self._submit_options: dict[str, Any] = {}
        self._grace = DEFAULT_LOSS_GRACE_SECONDS
        self._scheduler_address = "?"
        self._monitor: asyncio.Task[None] | None = None
        self._closing = False
        #: Why the client is unusable (set once it lost its scheduler for good).
        self._gone: str | None = None

    @property
    def client(self) -> Any:
        """The asynchronous ``distributed.Client`` (None before start)."""
        return self._client

    @property
    def cluster(self) -> Any:
        """The embedded ``LocalCluster``, when no ``address`` was configured."""
        return self._cluster

    async def start(self) -> None:
        """Connect to ``address`` or start the embedded LocalCluster (asynchronously).

        Raises:
            ConfigError: an unknown ``executor_config`` key (with a did-you-mean) or a bad
                value (the key, the value and what is expected).
            MainGuardError: the embedded cluster would start worker processes that re-run a
                main script lacking an ``if __name__ == "__main__":`` guard (says what to add).
            OSError: the scheduler cannot be reached within ``connect_timeout`` (names the
                address and the key).
        """
        options = DASK_OPTIONS.validate(self.config)
        import dask
        from distributed import Client, LocalCluster

        address = options["address"]
        client_options = dict(options["client_options"] or {})
        self._submit_options = dict(options["submit_options"] or {})
        self._grace = float(options["loss_grace_seconds"])
        connect_timeout = float(options["connect_timeout"])
        self._closing, self._gone = False, None
        existing = options["client"]
        if existing is not None:
            self._client = existing
            self._scheduler_address = _address_of(existing, "the given client's scheduler")
            self._watch_client()
            return
        if address is None:
            processes = options["processes"]
            if processes:
                check_main_guard(str(dask.config.get("distributed.worker.multiprocessing-method", "spawn")))
            cluster_options: dict[str, Any] = {
                "n_workers": options["n_workers"],
                "threads_per_worker": options["threads_per_worker"],
                "processes": processes,
                **dict(options["cluster_options"] or {}),
            }
            cluster_options = {k: v for k, v in cluster_options.items() if v is not None or k == "dashboard_address"}
            if "dashboard_address" not in cluster_options:
                # No dashboard. (dashboard_address=None alone still makes Dask's scheduler bind
                # its HTTP endpoints on port 8787: put them on a free loopback port instead.)
                cluster_options["dashboard_address"] = None
                scheduler_kwargs = dict(cluster_options.get("scheduler_kwargs") or {})
                scheduler_kwargs.setdefault("dashboard", False)
                scheduler_kwargs.setdefault("dashboard_address", "127.0.0.1:0")
                cluster_options["scheduler_kwargs"] = scheduler_kwargs
            # A worker that dies with a task ends the task at once (KilledWorker), so the
            # run's orphan policy decides what happens, not a silent re-run.
            with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
                self._cluster = await LocalCluster(asynchronous=True, **cluster_options)
            target: Any = self._cluster
            self._scheduler_address = str(self._cluster.scheduler_address)
        else:
            target = address
            self._scheduler_address = address
        client_options.setdefault("timeout", connect_timeout)
        try:
            # Dask bounds its connection attempts by `timeout`; the outer bound only guards
            # against a client that never answers at all.
            self._client = await asyncio.wait_for(Client(target, asynchronous=True, **client_options),
                                                  connect_timeout + 10.0)
        except BaseException as exc:
            if self._cluster is not None:
                await self._cluster.close()
                self._cluster = None
            if isinstance(exc, (OSError, asyncio.TimeoutError)):
                raise OSError(
                    f"dask executor cannot connect to the Dask scheduler at {self._scheduler_address} within "
                    f"executor_config.connect_timeout={connect_timeout:g} s: {type(exc).__name__}: {exc}. Check "
                    "executor_config.address and that the scheduler is running and reachable from here, or raise "
                    "executor_config.connect_timeout."
                ) from exc
            raise
        self._owns_client = True
        self._scheduler_address = _address_of(self._client, self._scheduler_address)
        self._watch_client()

    def _watch_client(self) -> None:
        self._monitor = asyncio.ensure_future(self._check_client())

    async def _check_client(self) -> None:
        """End every pending run once the client gave up on its scheduler (it never comes back)."""
        client = self._client
        try:
            while not self._closing:
                status = getattr(client, "status", "running")
                if status in ("closing", "closed", "failed"):
                    self._scheduler_lost(status)
                    return
                await asyncio.sleep(CLIENT_CHECK_SECONDS)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never die silently: say so and end the runs
            logger.exception("dask executor: watching the Dask client failed")
            self._scheduler_lost(f"unknown ({type(exc).__name__}: {exc})")

    def _scheduler_lost(self, status: str) -> None:
        self._gone = (f"dask executor: the Dask client lost its connection to the scheduler at "
                      f"{self._scheduler_address} and gave up reconnecting (client status {status!r}); the scheduler "
                      "died or became unreachable, and runs submitted to it cannot finish. Restart the scheduler and "
                      "the environment (executor_config.connect_timeout bounds the reconnection).")
        logger.error("%s", self._gone)
        for submission in list(self._submissions.values()):
            if self.is_pending(submission.run_id):
                self.report_lost(submission.run_id, f"{self._gone} Run {submission.run_id} was Dask task "
                                 f"{submission.key!r}.", None, redeliverable=False)
            if submission.watcher is not None:
                submission.watcher.cancel()

    async def submit(self, payload: dict[str, Any], frame: dict[str, Any]) -> DaskSubmission:
        """Submit ``payload`` as Dask task ``<task_id>-<run_id>`` (re-deliveries: ``...#<n>``).

        The ``<task_id>-`` prefix puts every run of one task in one Dask task group (as
        Dask's own ``<name>-<token>`` keys do); a key per group would make the scheduler's
        per-transition bookkeeping grow with the number of runs ever submitted.
        """
        from ._worker import run_payload

        if self._gone is not None:
            raise RuntimeError(self._gone)
        run_id = str(payload["run_id"])
        attempt = payload.get("attempt") or 1
        key = dask_key(str(payload.get("task_id") or "wove"), run_id, attempt)
        future = self._client.submit(run_payload, payload, key, key=key, pure=False, **self._submit_options)
        submission = DaskSubmission(run_id=run_id, key=key, future=future)
        submission.watcher = asyncio.ensure_future(self._watch(submission))
        self._submissions[run_id] = submission
        return submission

    async def cancel(self, run_id: str, submission: Any, frame: dict[str, Any]) -> None:
        """Cancel the run's Dask future; the worker-side task stops when it sees its key cancelled."""
        if not isinstance(submission, DaskSubmission):
            return
        submission.cancelled = True
        await self._client.cancel([submission.future])

    async def _watch(self, submission: DaskSubmission) -> None:
        try:
            await self._follow(submission)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug or a Dask surprise: end the run rather than strand it
            logger.exception("dask executor: watching Dask task %r failed", submission.key)
            self.report_lost(submission.run_id, f"dask executor: watching Dask task {submission.key!r} on the "
                             f"scheduler at {self._scheduler_address} failed: {type(exc).__name__}: {exc}", exc)
        finally:
            if self._submissions.get(submission.run_id) is submission:
                del self._submissions[submission.run_id]
            try:
                submission.future.release()
            except Exception as exc:  # the client may be closed already
                logger.debug("dask executor: releasing %r failed: %r", submission.key, exc)

    async def _follow(self, submission: DaskSubmission) -> None:
        future = submission.future
        await _settled(future)
        if future.status == "finished" and not self.is_pending(submission.run_id):
            return  # the worker posted the outcome before finishing: no need to fetch the result
        try:
            status = await future
        except asyncio.CancelledError:
            if future.status == "pending" or submission.cancelled:
                raise  # our own watcher was cancelled (close) or the user cancelled the run
            await self._on_failure(submission, f"the Dask future was cancelled ({future.status})", None)
            return
        except Exception as exc:
            await self._on_failure(submission, f"{type(exc).__name__}: {exc}", exc)
            return
        await self.settle(submission.run_id, status, what=f"the Dask task {submission.key!r}", grace=self._grace)

    async def _on_failure(self, submission: DaskSubmission, what: str, exc: BaseException | None) -> None:
        if submission.cancelled or await self.wait_for_terminal(submission.run_id, self._grace):
            return
        if self._gone is not None:
            self.report_lost(submission.run_id, self._gone, exc, redeliverable=False)
            return
        status = getattr(self._client, "status", None)
        connection = "" if status in (None, "running") else (
            f"; the client lost its connection to the scheduler (client status {status!r})")
        self.report_lost(
            submission.run_id,
            f"dask executor: the Dask task {submission.key!r} on the scheduler at {self._scheduler_address} failed "
            f"before its worker reported an outcome ({what}{connection}); the worker running it died or the "
            "cluster lost it.",
            exc,
        )

    async def close(self) -> None:
        """Stop watching, close the client we opened and the embedded cluster (bounded)."""
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
        try:
            if self._owns_client and self._client is not None:
                await asyncio.wait_for(self._client.close(), 10)
        except Exception as exc:
            logger.warning("dask executor: closing the Dask client failed: %r", exc)
        finally:
            self._client = None
            if self._cluster is not None:
                try:
                    await asyncio.wait_for(self._cluster.close(), 20)
                except Exception as exc:
                    logger.warning("dask executor: closing the embedded LocalCluster failed: %r", exc)
                self._cluster = None
