"""``wove.backend``: the backend-adapter machinery, provided by the wove-backend distribution.

The callback server, payloads and payload runner that let a Wove task run on an existing
distributed engine (Dask, ...) live in ``wove_backend``; this module keeps their Wove 2.x
import path. Without wove-backend installed, importing it raises ImportError naming the
distribution to install.
"""

from __future__ import annotations

try:
    from wove_backend import *  # noqa: F403  (the whole public API, under its seed name)
    from wove_backend import __all__ as __all__
except ImportError as exc:
    if exc.name != "wove_backend":
        raise
    from .registry import install_hint

    raise ImportError(
        "wove.backend is provided by the wove-backend distribution, which is not installed. "
        f"Install it with: {install_hint('wove-backend')}",
        name="wove_backend",
    ) from exc
