"""What runs inside a Dask worker: the Wove payload, with cancellation by key.

Dask does not interrupt a running task when its future is cancelled, so this coroutine
task (Dask runs coroutine functions on the worker's event loop) watches its own key in
the worker's state and cancels the Wove run when the key is cancelled or released. Sync
callables run in the worker's own thread pool, so ``threads_per_worker`` still bounds
them.
"""

from __future__ import annotations

import asyncio
from typing import Any

from wove.backend import run_engine_payload

__all__ = ["run_payload"]

#: Seconds between checks of the task's key for cancellation.
CANCEL_POLL_SECONDS = 0.1


async def run_payload(payload: dict[str, Any], key: str) -> dict[str, Any]:
    """Run a Wove backend payload as Dask task ``key``; post its events to the callback URL.

    Returns the run's :func:`wove.backend.engine_status`: small when the outcome reached the
    callback, else carrying the terminal event, which the submitter then delivers (so
    results come back through Dask when the workers cannot reach the caller).

    Raises:
        ValueError: the payload lacks its callback URL or ids.
    """
    from distributed import get_worker

    try:
        worker: Any = get_worker()
    except ValueError:  # not inside a worker (a test calling this directly)
        worker = None
    cancel = asyncio.Event()
    loop = asyncio.get_running_loop()
    timer: list[asyncio.TimerHandle] = []

    def check() -> None:  # a timer, not a task per run: cheap for the many short runs
        state = worker.state.tasks.get(key)
        if state is None or state.state in ("cancelled", "released", "forgotten"):
            cancel.set()
        else:
            timer[:] = [loop.call_later(CANCEL_POLL_SECONDS, check)]

    if worker is not None:
        timer.append(loop.call_later(CANCEL_POLL_SECONDS, check))
    try:
        threads = worker.executors.get("default") if worker is not None else None
        return await run_engine_payload(payload, cancel_event=cancel, executor=threads)
    finally:
        for handle in timer:
            handle.cancel()
