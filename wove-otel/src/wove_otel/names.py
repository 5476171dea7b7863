"""Span, attribute, event and metric names (one place: the docs and the tests read them here)."""

from __future__ import annotations

#: no schema URL is claimed: the attributes follow the current RPC and messaging
#: conventions, listed below, not one frozen version of them
SCHEMA_URL: str | None = None

# -- OpenTelemetry semantic conventions ----------------------------------------------------
RPC_SYSTEM = "wove"
RPC_SYSTEM_NAME = "rpc.system.name"
RPC_METHOD = "rpc.method"
MESSAGING_SYSTEM = "messaging.system"
MESSAGING_OPERATION_TYPE = "messaging.operation.type"
MESSAGING_OPERATION_NAME = "messaging.operation.name"
MESSAGING_DESTINATION_NAME = "messaging.destination.name"
MESSAGING_MESSAGE_ID = "messaging.message.id"
ERROR_TYPE = "error.type"

# -- Wove's own attributes -----------------------------------------------------------------
WOVE_ENVIRONMENT = "wove.environment"
WOVE_EXECUTOR = "wove.executor"
WOVE_TASK = "wove.task"
WOVE_RUN_ID = "wove.run_id"
WOVE_OUTCOME = "wove.outcome"
WOVE_WORKER = "wove.worker"
WOVE_DELIVERIES = "wove.deliveries"
WOVE_DELIVERY = "wove.delivery"
WOVE_REQUEST_SIZE = "wove.request.size"
WOVE_REASON = "wove.reason"
WOVE_MESSAGE = "wove.message"

# -- span events ---------------------------------------------------------------------------
EVENT_STARTED = "wove.run.started"
EVENT_REDELIVERED = "wove.run.redelivered"
EVENT_TIMED_OUT = "wove.run.timed_out"
EVENT_CANCELLED = "wove.run.cancelled"

# -- metrics -------------------------------------------------------------------------------
RUN_DURATION = "wove.run.duration"
RUN_ACTIVE = "wove.run.active"
RUN_OUTCOMES = "wove.run.outcomes"
RUN_REDELIVERIES = "wove.run.redeliveries"
RUN_REQUEST_SIZE = "wove.run.request.size"
EXECUTION_DURATION = "wove.execution.duration"
EXECUTION_ACTIVE = "wove.execution.active"


def rpc_method(task: str) -> str:
    """``rpc.method`` (and the span name) of a run of ``task``: ``wove/<task>``."""
    return f"wove/{task}"
