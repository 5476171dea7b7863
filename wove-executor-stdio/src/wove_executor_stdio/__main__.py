"""``python -m wove_executor_stdio``: the built-in stdio worker (see :mod:`.worker`)."""

from __future__ import annotations

import os
import sys

from .worker import main

if __name__ == "__main__":
    status = main()
    # Threads still running cancelled sync tasks must not keep the process alive.
    sys.stderr.flush()
    os._exit(status)
