"""In-process execution: the worker engine without a wire."""

from __future__ import annotations

import asyncio
from typing import Any

from .executor import EnvironmentExecutor
from .options import POSITIVE_INT, Option, OptionSpec
from .worker import WorkerEngine

__all__ = ["LOCAL_OPTIONS", "LocalEnvironmentExecutor"]

#: The local executor's ``executor_config`` keys (the definition-level ``max_workers``
#: lands in ``max_workers``).
LOCAL_OPTIONS = OptionSpec("local", [
    Option("max_workers", POSITIVE_INT, doc="threads for sync callables (default 64)"),
    Option("max_concurrency", POSITIVE_INT, 10_000, "runs executing at once; more wait"),
])


class LocalEnvironmentExecutor(EnvironmentExecutor):
    """In-process executor implementation.

    Async callables run on the runtime's loop; sync callables run in a bounded thread
    pool (``max_workers`` of the environment, default 64) so a
    blocking task never stalls the loop. ``max_concurrency`` caps runs executing at once.

    It declares ``runs_inline`` and ``runs_sync_inline``:
    :class:`~wove.environment.ExecutorRuntime` runs callables without an idempotency key
    directly from the calling task (:meth:`run_inline`): an async one is awaited there, a
    sync one is handed to the thread pool and its result awaited there. In process, a
    frame round trip buys nothing, and skipping it makes a call several times cheaper.
    Timeouts, cancellation and orphan policies behave exactly as for frames. A subclass
    gets every call as frames (its own ``send``/``recv`` see them all) unless it sets
    ``runs_inline = True`` itself.
    """

    runs_inline = True
    runs_sync_inline = True
    config_options = LOCAL_OPTIONS
    #: in process, the engine streams generator results (runtime.stream)
    capabilities = frozenset({"task_yield"})

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "runs_inline" not in cls.__dict__:
            cls.runs_inline = False
        if "runs_sync_inline" not in cls.__dict__:
            cls.runs_sync_inline = cls.runs_inline and cls.runs_sync_inline

    def __init__(self) -> None:
        self._engine: WorkerEngine | None = None
        self._events: asyncio.Queue[dict[str, Any]] | None = None

    async def start(
        self,
        *,
        environment_name: str,
        environment_config: dict[str, Any],
        run_config: dict[str, Any],
    ) -> None:
        """Start the worker engine.

        Raises:
            ConfigError: an unknown ``executor_config`` key or a bad value.
        """
        config = LOCAL_OPTIONS.validate(environment_config, environment=environment_name)
        self._events = asyncio.Queue()
        self._engine = WorkerEngine(
            max_concurrency=config["max_concurrency"],
            max_threads=config["max_workers"],
            remember_run_ids=False,
            announce_start=False,
            capture_output=False,  # in process, a task's output already is the caller's
            name=f"local:{environment_name}",
        )

    async def send(self, frame: dict[str, Any]) -> None:
        if self._engine is None or self._events is None:
            raise RuntimeError("Local executor is not started.")
        frame_type = frame.get("type")
        if frame_type == "run_task":
            if not callable(frame.get("callable")):
                raise TypeError(f"run_task for {frame.get('run_id')!r} has a non-callable 'callable'")
            await self._engine.submit(frame, self._events.put_nowait)
        elif frame_type == "cancel_task":
            self._engine.cancel(str(frame.get("run_id")))
        elif frame_type == "stream_credit":
            self._engine.grant(str(frame.get("run_id")), frame.get("credit"))
        elif frame_type == "shutdown":
            policy = frame.get("delivery_orphan_policy")
            await self._engine.shutdown(policy, grace=0.0 if policy != "detach" else 10.0)
        else:
            raise ValueError(
                f"Unsupported frame type {frame_type!r}; expected run_task, cancel_task or shutdown."
            )

    async def run_inline(self, func: Any, args: dict[str, Any]) -> Any:
        """Await an async callable in the calling task, or a sync one's call in the thread
        pool (the runtime's fast path)."""
        if self._engine is None:
            raise RuntimeError("Local executor is not started.")
        return await self._engine.run_inline(func, args)

    async def recv(self) -> dict[str, Any]:
        if self._events is None:
            raise RuntimeError("Local executor is not started.")
        return await self._events.get()

    async def stop(self) -> None:
        if self._engine is not None:
            await self._engine.aclose()
        self._engine = None
        self._events = None
