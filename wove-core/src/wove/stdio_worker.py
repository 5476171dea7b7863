"""``python -m wove.stdio_worker``: Wove 2.x's stdio worker, provided by wove-executor-stdio.

Runs :func:`wove_executor_stdio.worker.main` (JSON-lines commands on stdin, events on
stdout; Wove 2.x's ``--adapter`` flag is accepted). Without wove-executor-stdio installed
it exits 2 and says what to install.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

MISSING = "python -m wove.stdio_worker needs wove-executor-stdio: pip install wove-executor-stdio"


def main(argv: Sequence[str] | None = None) -> int:
    """Serve stdin/stdout until end of input or ``shutdown``; the exit status."""
    try:
        from wove_executor_stdio.worker import main as serve
    except ImportError as exc:
        if exc.name != "wove_executor_stdio":
            raise
        print(MISSING, file=sys.stderr)
        return 2
    return serve(argv)


if __name__ == "__main__":
    status = main()
    # As `python -m wove_executor_stdio`: threads still running abandoned sync tasks must
    # not keep the process alive.
    sys.stderr.flush()
    os._exit(status)
