"""``wove.integrations.worker``: Wove 2.x's backend worker functions, provided by wove-backend.

``run(payload)`` runs a backend payload and posts its events to its callback URL (the task's
result, or its terminal event when it did not succeed); ``arun`` is the same on a running
loop; ``run_backend_frame`` is 2.x's other name of ``run``. Importing this module without
wove-backend installed raises ImportError naming it.
"""

from __future__ import annotations

try:
    from wove_backend.worker import arun, run, run_backend_frame
except ImportError as exc:
    if exc.name != "wove_backend":
        raise
    from ..registry import install_hint

    raise ImportError(
        "wove.integrations.worker is provided by the wove-backend distribution, which is not installed. "
        f"Install it with: {install_hint('wove-backend')}",
        name="wove_backend",
    ) from exc

__all__ = ["arun", "run", "run_backend_frame"]
