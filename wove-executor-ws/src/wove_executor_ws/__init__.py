"""Wove executor and worker service for running tasks over one multiplexed WebSocket.

``WebSocketEnvironmentExecutor`` is the ``websocket`` (alias ``ws``) executor;
``wove_executor_ws.server.WebSocketWorkerServer`` is the worker service behind
``wove worker websocket``.
"""

from __future__ import annotations

from .executor import WebSocketEnvironmentExecutor

__all__ = ["WebSocketEnvironmentExecutor"]
