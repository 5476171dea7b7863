"""``python -m wove_backend``: the same as ``python -m wove.backend_worker``."""

from __future__ import annotations

from .worker import main

if __name__ == "__main__":
    raise SystemExit(main(prog="python -m wove_backend"))
