"""Wove executor and worker service for running tasks over gRPC (grpc.aio, no generated stubs).

Importing this package does not import ``grpc``; the executor imports it in ``start()``.
"""

from __future__ import annotations

from .executor import GrpcEnvironmentExecutor

__all__ = ["GrpcEnvironmentExecutor"]
