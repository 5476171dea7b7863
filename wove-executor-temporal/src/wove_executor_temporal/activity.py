"""The Wove activity: runs a backend payload in the one worker engine, heartbeating Temporal.

The activity posts the run's events to the caller's callback server (signed with the
payload's key) and returns the run's engine status, which Temporal stores as the
activity's (and the workflow's) result: when the callback server cannot be reached, that
status carries the terminal event, and the caller takes the outcome from the workflow
result instead (``executor_config.result_channel``).

While the run executes, a loop heartbeats the activity (every half second, or every third
of its heartbeat timeout when shorter), so Temporal notices a dead worker, and delivers a
cancellation (the workflow was
cancelled, or the heartbeat timed out) in the heartbeat's answer: the run is then
cancelled in the engine (an async task stops; a sync one is abandoned) before the
activity reports itself cancelled. When the worker shuts down with the run still going,
the run ends with a ``WorkerStopped`` error (retryable) instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from typing import Any

from temporalio import activity

from ._names import ACTIVITY_NAME

__all__ = ["CANCEL_WAIT_SECONDS", "PayloadActivity", "run_wove_payload"]

logger = logging.getLogger(__name__)

#: Seconds a cancelled run gets to stop (and post ``task_cancelled``) before the
#: activity reports itself cancelled anyway.
CANCEL_WAIT_SECONDS = 5.0
#: Longest seconds between two ``activity.heartbeat()`` calls. A cancellation reaches the
#: activity only in a heartbeat's answer; the SDK sends at most one heartbeat per throttle
#: interval (the worker's ``--heartbeat-throttle``, 1 s) whatever the calls, so calling
#: often costs nothing on the wire and bounds the cancellation latency by that throttle.
HEARTBEAT_CALL_SECONDS = 0.5


async def _heartbeat(interval: float) -> None:
    while True:
        activity.heartbeat()
        await asyncio.sleep(interval)


class PayloadActivity:
    """The Wove payload activity, registered as :data:`~wove_executor_temporal.workflow.ACTIVITY_NAME`.

    Register ``PayloadActivity(threads).run`` with a ``temporalio.worker.Worker`` next to
    :class:`~wove_executor_temporal.workflow.WovePayloadWorkflow` (or use
    :func:`wove_executor_temporal.worker.build_worker`).

    Args:
        threads: the thread pool sync callables run in (default: the worker engine's
            daemon threads).
    """

    def __init__(self, threads: concurrent.futures.Executor | None = None) -> None:
        self.threads = threads

    @activity.defn(name=ACTIVITY_NAME)
    async def run(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Run ``payload``; return its engine status (see :func:`wove_backend.engine_status`).

        Raises:
            asyncio.CancelledError: Temporal cancelled the activity (after the run stopped).
            ValueError: the payload lacks its callback URL or ids.
        """
        from wove_backend import run_engine_payload

        timeout = activity.info().heartbeat_timeout
        interval = HEARTBEAT_CALL_SECONDS
        if timeout:
            interval = max(min(timeout.total_seconds() / 3.0, interval), 0.05)
        cancel = asyncio.Event()
        job = asyncio.ensure_future(run_engine_payload(payload, cancel_event=cancel, executor=self.threads))
        beat = asyncio.ensure_future(_heartbeat(interval))
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            if activity.is_worker_shutdown():
                job.cancel()  # the runner reports WorkerStopped to the caller
                await asyncio.gather(job, return_exceptions=True)
                raise
            details_of = getattr(activity, "cancellation_details", None)  # temporalio >= 1.12
            details = details_of() if details_of is not None else None
            logger.info("activity %s for run %s cancelled by Temporal (%s)", activity.info().activity_id,
                        payload.get("run_id"), details)
            cancel.set()
            try:
                await asyncio.wait_for(asyncio.shield(job), CANCEL_WAIT_SECONDS)
            except Exception as exc:  # the run did not stop in time; Temporal still learns it was cancelled
                logger.warning("run %s did not stop within %g s of its cancellation: %r", payload.get("run_id"),
                               CANCEL_WAIT_SECONDS, exc)
            raise
        finally:
            beat.cancel()


#: The activity with the engine's default threads (for ``activities=[run_wove_payload]``).
run_wove_payload = PayloadActivity().run
