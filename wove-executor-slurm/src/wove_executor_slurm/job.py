"""What a Slurm job runs: ``python -m wove_executor_slurm.job PAYLOAD_FILE``.

The ``slurm`` executor writes each run's payload to a file only its user can read (mode
0600) and submits ``<command> <that file>``; nothing of the payload is on the ``sbatch``
command line or in the job's environment. This program reads the file, removes it, runs
the payload in the one Wove worker engine (its events go to the caller's callback
server, signed with the run's key) and prints the run's engine status as its last line::

    WOVE-ENGINE-STATUS {"wove_status": 1, "posted": false, "event": "..."}

to standard output, that is, to the job's output file: when the workers cannot reach the
caller, the executor reads the outcome from there. SIGTERM (``scancel``, or Slurm ending
the job) cancels the run (an async task stops; a sync one is abandoned) before the job
exits.

Exit status: 0 when the payload ran (whatever the task did: its outcome is in the status
line and the callback), 1 when the payload file is missing or unreadable, 2 on a bad
command line, 3 when the payload is not a Wove payload.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["STATUS_MARKER", "main", "parse_status", "read_payload"]

#: The prefix of the status line in the job's output file.
STATUS_MARKER = "WOVE-ENGINE-STATUS "


def read_payload(path: str) -> dict[str, Any]:
    """Read the payload file and remove it (it holds the run's key and pickled code).

    Raises:
        OSError: the file cannot be read.
        ValueError: it does not hold a JSON object.
    """
    with open(path, encoding="utf-8") as file:
        text = file.read()
    try:
        os.unlink(path)
    except OSError:
        pass  # already gone (another reader), or a read-only directory: nothing more to do
    payload = json.loads(text)
    if not isinstance(payload, dict):
        raise ValueError(f"payload file {path} holds {type(payload).__name__}, not a JSON object")
    return payload


def parse_status(text: str) -> dict[str, Any] | None:
    """The engine status in a job's output (its last :data:`STATUS_MARKER` line), or None."""
    for line in reversed(text.splitlines()):
        if line.startswith(STATUS_MARKER):
            try:
                status = json.loads(line[len(STATUS_MARKER):])
            except ValueError:
                return None
            return status if isinstance(status, dict) else None
    return None


async def _run(payload: dict[str, Any]) -> dict[str, Any]:
    from wove_backend import run_engine_payload

    cancel = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, cancel.set)
    return await run_engine_payload(payload, cancel_event=cancel)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m wove_executor_slurm.job PAYLOAD_FILE``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m wove_executor_slurm.job PAYLOAD_FILE (the wove slurm executor writes it)",
              file=sys.stderr)
        return 2
    try:
        payload = read_payload(args[0])
    except (OSError, ValueError) as exc:
        print(f"wove slurm job: cannot read the payload file {args[0]}: {exc}. The slurm executor removes it "
              "once the job read it; a job started again by hand or by Slurm finds it gone (submit with "
              "--no-requeue), and the job must run as the user who submitted it.", file=sys.stderr)
        return 1
    try:
        status = asyncio.run(_run(payload))
    except ValueError as exc:
        print(f"wove slurm job: {exc}", file=sys.stderr)
        return 3
    sys.stdout.write(STATUS_MARKER + json.dumps(status, separators=(",", ":")) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
