"""``python -m wove.stdio_worker``: Wove 2.x's stdio worker, provided by wove-executor-stdio.

Runs :func:`wove_executor_stdio.worker.main` (JSON-lines commands on stdin, events on
stdout; Wove 2.x's ``--adapter`` flag is accepted). Without wove-executor-stdio installed
it exits 2 and says what to install.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from ._entry import run_provided


def main(argv: Sequence[str] | None = None) -> int:
    """Serve stdin/stdout until end of input or ``shutdown``; the exit status."""
    return run_provided("python -m wove.stdio_worker", "wove_executor_stdio.worker", "wove-executor-stdio", argv)


if __name__ == "__main__":
    status = main()
    # As `python -m wove_executor_stdio`: threads still running abandoned sync tasks must
    # not keep the process alive.
    sys.stderr.flush()
    os._exit(status)
