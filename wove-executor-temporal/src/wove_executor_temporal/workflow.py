"""The Wove workflow: one Temporal activity runs the payload (workflows stay deterministic).

This module is imported inside Temporal's workflow sandbox, so it imports only
``temporalio`` and the standard library; the activity is referred to by its name.

The workflow receives the Wove backend payload (the Wove 2.x shape) as its only argument,
the same argument Wove 2.x's ``client.start_workflow(workflow, payload, ...)`` passes, and
runs activity :data:`ACTIVITY_NAME` with it once (no Temporal retries: the caller's
``delivery_orphan_policy`` decides whether a lost run is delivered again). Cancelling the
workflow cancels the activity and waits until the activity has stopped. The activity's
timeouts come from the payload's ``temporal_activity`` entry, which the ``temporal``
executor fills from its ``executor_config``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.workflow import ActivityCancellationType

from ._names import (
    ACTIVITY_NAME,
    DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_START_TO_CLOSE_TIMEOUT,
    WORKFLOW_NAME,
)

__all__ = [
    "ACTIVITY_NAME",
    "DEFAULT_HEARTBEAT_TIMEOUT",
    "DEFAULT_START_TO_CLOSE_TIMEOUT",
    "WORKFLOW_NAME",
    "WovePayloadWorkflow",
]


def _seconds(options: dict[str, Any], key: str, default: float) -> float:
    value = options.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    return default


@workflow.defn(name=WORKFLOW_NAME, sandboxed=False)
class WovePayloadWorkflow:
    """Runs one Wove backend payload in activity :data:`ACTIVITY_NAME` and returns its status.

    The return value is what the activity returned: the run's engine status (see
    :func:`wove_backend.engine_status`), which carries the encoded terminal event when the
    worker could not post it to the caller's callback server.
    """

    @workflow.run
    async def run(self, payload: dict[str, Any]) -> Any:
        """Execute the activity once with ``payload``; cancellation waits for the activity."""
        options = payload.get("temporal_activity") if isinstance(payload, dict) else None
        options = options if isinstance(options, dict) else {}
        return await workflow.execute_activity(
            ACTIVITY_NAME,
            payload,
            start_to_close_timeout=timedelta(
                seconds=_seconds(options, "start_to_close_timeout", DEFAULT_START_TO_CLOSE_TIMEOUT)),
            heartbeat_timeout=timedelta(seconds=_seconds(options, "heartbeat_timeout", DEFAULT_HEARTBEAT_TIMEOUT)),
            retry_policy=RetryPolicy(maximum_attempts=1),
            cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
        )
