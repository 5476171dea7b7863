"""``python -m wove.backend_worker``: Wove 2.x's backend worker, provided by wove-backend.

Runs one backend payload (base64 JSON in the first argument or ``$WOVE_BACKEND_PAYLOAD``)
with :func:`wove_backend.worker.main`. Without wove-backend installed it exits 2 and says
what to install.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

MISSING = "python -m wove.backend_worker needs wove-backend: pip install wove-backend"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the payload given; the exit status (2: wove-backend is not installed)."""
    try:
        from wove_backend.worker import main as run_worker
    except ImportError as exc:
        if exc.name != "wove_backend":
            raise
        print(MISSING, file=sys.stderr)
        return 2
    return run_worker(argv)


if __name__ == "__main__":
    raise SystemExit(main())
