"""DaskAdapter: submits Wove payloads to a Dask distributed cluster.

``distributed`` is imported in :meth:`DaskAdapter.start`, never at import time.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from wove.backend import BackendAdapter
from wove.protocol import decode_events

__all__ = ["DaskAdapter", "DaskSubmission", "dask_key"]

logger = logging.getLogger(__name__)

#: Seconds a failed future waits for the worker's own terminal callback before the run
#: is declared lost (the callback and the failure race).
DEFAULT_LOSS_GRACE_SECONDS = 1.0
_RESERVED_SUBMIT_OPTIONS = ("key", "pure")


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

    @property
    def client(self) -> Any:
        """The asynchronous ``distributed.Client`` (None before start)."""
        return self._client

    @property
    def cluster(self) -> Any:
        """The embedded ``LocalCluster``, when no ``address`` was configured."""
        return self._cluster

    def _option(self, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        value = self.config.get(key, default)
        if value is not None and (not isinstance(value, kind) or (isinstance(value, bool) and kind is int)):
            expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise ValueError(f"dask executor: executor_config.{key} must be {expected}, got {value!r}.")
        return value

    async def start(self) -> None:
        """Connect to ``address`` or start the embedded LocalCluster (asynchronously).

        Raises:
            ValueError: a config value has the wrong type.
            OSError / TimeoutError: the scheduler cannot be reached (names the address).
        """
        import dask
        from distributed import Client, LocalCluster

        address = self._option("address", str)
        client_options = dict(self._option("client_options", dict) or {})
        self._submit_options = dict(self._option("submit_options", dict) or {})
        for reserved in _RESERVED_SUBMIT_OPTIONS:
            if reserved in self._submit_options:
                raise ValueError(f"dask executor: executor_config.submit_options may not set {reserved!r}; "
                                 "Wove keys each task by its run id.")
        self._grace = float(self._option("loss_grace_seconds", (int, float), DEFAULT_LOSS_GRACE_SECONDS))
        existing = self.config.get("client")
        if existing is not None:
            if not getattr(existing, "asynchronous", False):
                raise ValueError("dask executor: executor_config.client must be an asynchronous Client "
                                 "(Client(..., asynchronous=True)) on the runtime's loop; or give 'address'.")
            self._client = existing
            return
        if address is None:
            cluster_options: dict[str, Any] = {
                "n_workers": self._option("n_workers", int),
                "threads_per_worker": self._option("threads_per_worker", int),
                "processes": self._option("processes", bool, True),
                "dashboard_address": None,
                **dict(self._option("cluster_options", dict) or {}),
            }
            cluster_options = {k: v for k, v in cluster_options.items() if v is not None or k == "dashboard_address"}
            # A worker that dies with a task ends the task at once (KilledWorker), so the
            # run's orphan policy decides what happens, not a silent re-run.
            with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
                self._cluster = await LocalCluster(asynchronous=True, **cluster_options)
            target: Any = self._cluster
        else:
            target = address
        try:
            self._client = await Client(target, asynchronous=True, **client_options)
        except BaseException as exc:
            if self._cluster is not None:
                await self._cluster.close()
                self._cluster = None
            if isinstance(exc, (OSError, asyncio.TimeoutError)):
                raise OSError(f"dask executor cannot connect to the Dask scheduler at {address}: {exc}. "
                              "Check executor_config.address and that the scheduler is running.") from exc
            raise
        self._owns_client = True

    async def submit(self, payload: dict[str, Any], frame: dict[str, Any]) -> DaskSubmission:
        """Submit ``payload`` as Dask task ``<task_id>-<run_id>`` (re-deliveries: ``...#<n>``).

        The ``<task_id>-`` prefix puts every run of one task in one Dask task group (as
        Dask's own ``<name>-<token>`` keys do); a key per group would make the scheduler's
        per-transition bookkeeping grow with the number of runs ever submitted.
        """
        from ._worker import run_payload

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
        future = submission.future
        try:
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
            if isinstance(status, dict) and status.get("posted") is False:
                for event in decode_events(status["event"]):
                    self.report_event(event)
            elif self.is_pending(submission.run_id) and not await self.wait_for_terminal(
                submission.run_id, self._grace
            ):
                self.report_lost(submission.run_id, f"dask executor: the Dask task {submission.key!r} finished "
                                 "but its worker never reported the run's outcome.")
        finally:
            if self._submissions.get(submission.run_id) is submission:
                del self._submissions[submission.run_id]
            future.release()

    async def _on_failure(self, submission: DaskSubmission, what: str, exc: BaseException | None) -> None:
        if submission.cancelled or await self.wait_for_terminal(submission.run_id, self._grace):
            return
        where = f"scheduler {self._client.scheduler.address}" if self._client is not None else "Dask"
        self.report_lost(
            submission.run_id,
            f"dask executor: the Dask task {submission.key!r} on {where} failed before its worker "
            f"reported an outcome ({what}); the worker running it died or the cluster lost it.",
            exc,
        )

    async def close(self) -> None:
        """Stop watching, close the client we opened and the embedded cluster (bounded)."""
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
