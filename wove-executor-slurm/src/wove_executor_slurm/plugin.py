"""Registers the ``slurm`` executor."""

from __future__ import annotations

from collections.abc import Callable

from wove import hookimpl
from wove.backend import BackendAdapterEnvironmentExecutor, register_backend_adapter

from .adapter import SlurmAdapter

__all__ = ["build_slurm_executor", "wove_register_executors"]


def build_slurm_executor() -> BackendAdapterEnvironmentExecutor:
    """A fresh, unstarted ``slurm`` executor."""
    return BackendAdapterEnvironmentExecutor("slurm", SlurmAdapter)


@hookimpl
def wove_register_executors(register: Callable[..., None]) -> None:
    register_backend_adapter("slurm", SlurmAdapter)
    register("slurm", build_slurm_executor,
             description="Slurm: each task a batch job (sbatch), its payload in a private file")
