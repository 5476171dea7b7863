"""Wove over HTTP(S): the ``http``/``https`` executors (httpx) and an ASGI worker service.

``HttpEnvironmentExecutor`` sends command frames to a worker service; ``create_app()``
(in :mod:`wove_executor_http.server`) builds the worker service's ASGI application, and
``wove worker http`` serves it with uvicorn.
"""

from __future__ import annotations

from .executor import HttpEnvironmentExecutor

__all__ = ["HttpEnvironmentExecutor"]
