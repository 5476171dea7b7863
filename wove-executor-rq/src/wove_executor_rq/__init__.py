"""Wove backend adapter for RQ: run Wove tasks as jobs on RQ (Redis Queue) workers.

Use ``"executor": "rq"`` in an environment definition (see the README for the
``executor_config`` keys). Importing this package imports neither rq nor redis; the
workers' side is :mod:`wove_executor_rq.worker`.
"""

from __future__ import annotations

from .adapter import DEFAULT_FUNCTION, RQ_OPTIONS, RQAdapter, RQSubmission, rq_job_id
from .plugin import build_rq_executor

__all__ = ["DEFAULT_FUNCTION", "RQ_OPTIONS", "RQAdapter", "RQSubmission", "build_rq_executor", "rq_job_id"]
