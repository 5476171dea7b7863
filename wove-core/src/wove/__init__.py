"""Wove: run a Python function in another process, worker service or cluster.

The public API is :mod:`wove.environment`. Plugins mark their hooks with
:data:`hookimpl` (see :mod:`wove.hookspecs`).
"""

from __future__ import annotations

from importlib import metadata

from .hookspecs import hookimpl
from .registry import WOVE_PLUGIN_API

__all__ = ["WOVE_PLUGIN_API", "__version__", "hookimpl"]

try:
    __version__ = metadata.version("wove-core")
except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"
