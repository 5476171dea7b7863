"""Names and defaults shared by the adapter, the workflow and the worker (imports nothing heavy)."""

from __future__ import annotations

__all__ = ["ACTIVITY_NAME", "DEFAULT_HEARTBEAT_TIMEOUT", "DEFAULT_START_TO_CLOSE_TIMEOUT", "WORKFLOW_NAME"]

#: The workflow type name (what ``executor_config.workflow`` defaults to). It is the name
#: of the workflow class in Wove 2.x's Temporal guide, so a Wove 2.x client configured
#: with ``"workflow": "WovePayloadWorkflow"`` runs on these workers too.
WORKFLOW_NAME = "WovePayloadWorkflow"
#: The activity type name (also the name in Wove 2.x's guide).
ACTIVITY_NAME = "run_wove_payload"
#: Seconds without an activity heartbeat after which Temporal declares the activity lost.
DEFAULT_HEARTBEAT_TIMEOUT = 10.0
#: Seconds one activity may run at most (a day).
DEFAULT_START_TO_CLOSE_TIMEOUT = 86400.0
