"""``python -m wove.backend_worker``: Wove 2.x's backend worker, provided by wove-backend.

Runs one backend payload (base64 JSON in the first argument or ``$WOVE_BACKEND_PAYLOAD``)
with :func:`wove_backend.worker.main`. Without wove-backend installed it exits 2 and says
what to install.
"""

from __future__ import annotations

from collections.abc import Sequence

from ._entry import run_provided


def main(argv: Sequence[str] | None = None) -> int:
    """Run the payload given; the exit status (2: wove-backend is not installed)."""
    return run_provided("python -m wove.backend_worker", "wove_backend.worker", "wove-backend", argv)


if __name__ == "__main__":
    raise SystemExit(main())
