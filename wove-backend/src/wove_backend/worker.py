"""The Wove 2.x worker entry points for backend payloads.

* :func:`run` / :func:`arun` (``wove.integrations.worker.run`` / ``arun``; ``run_backend_frame``
  is 2.x's alias of ``run``): run one payload (a dict) and post its events to its callback
  URL; return the task's result, or the terminal event when the task did not succeed.
* :func:`main`: ``python -m wove.backend_worker [PAYLOAD_B64]`` (also ``python -m
  wove_backend``): the payload as base64 JSON in the first argument or in
  ``$WOVE_BACKEND_PAYLOAD``. Exit status 0 when the payload ran and its terminal event was
  posted (whatever the task returned or raised: that travels in the callback), 1 when no
  payload was given, it is not a valid payload, or its terminal event could not be posted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from ._runner import execute_backend_payload, run_backend_payload, run_backend_payload_async

__all__ = ["PAYLOAD_ENV", "arun", "main", "run", "run_backend_frame"]

#: Environment variable holding the base64 payload when no argument is given (Wove 2.x).
PAYLOAD_ENV = "WOVE_BACKEND_PAYLOAD"

_USAGE = f"""usage: python -m wove.backend_worker [PAYLOAD_B64]

Run one Wove backend payload (base64 of its JSON, from the argument or ${PAYLOAD_ENV})
and post its events to the payload's callback URL.
"""


def run(payload: dict[str, Any]) -> Any:
    """Run ``payload`` and post its events; the task's result, or its terminal event.

    Raises:
        RuntimeError: called with a running event loop on this thread (use :func:`arun`).
        ValueError: the payload lacks ``callback_url``, ``run_id`` or ``task_id``.
    """
    return run_backend_payload(payload)


async def arun(payload: dict[str, Any]) -> Any:
    """:func:`run` on a running event loop."""
    return await run_backend_payload_async(payload)


#: Wove 2.x's other name of :func:`run`.
run_backend_frame = run


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m wove.backend_worker") -> int:
    """``python -m wove.backend_worker``: run the payload given; return the exit status."""
    from . import payload_from_b64

    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(_USAGE, end="")
        return 0
    if len(args) > 1:
        print(f"{prog}: expected at most one argument (the base64 payload), got {len(args)}.\n{_USAGE}",
              file=sys.stderr, end="")
        return 1
    encoded = args[0] if args else os.environ.get(PAYLOAD_ENV, "")
    if not encoded:
        print(f"Missing dispatch payload. Pass it as argv[1] or {PAYLOAD_ENV}.", file=sys.stderr)
        return 1
    logging.basicConfig(stream=sys.stderr, level=os.environ.get("WOVE_LOG_LEVEL", "WARNING").upper(),
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    try:
        payload = payload_from_b64(encoded)
    except ValueError as exc:  # binascii.Error and JSONDecodeError are ValueErrors
        print(f"{prog}: the payload is not base64 of a JSON object ({type(exc).__name__}: {exc}). "
              f"Pass what wove.backend.payload_to_b64() returns.", file=sys.stderr)
        return 1
    try:
        event, posted = asyncio.run(execute_backend_payload(payload))
    except ValueError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    if not posted:
        print(f"{prog}: the {event['type']} of run {event.get('run_id')} could not be posted to its "
              "callback URL (see the log above).", file=sys.stderr)
        return 1
    return 0
