"""wove.testing: test kits and task helpers for executor and worker-service distributions.

* :class:`ExecutorContract` — the contract test kit every executor runs against itself
  (subclass it in a pytest module; see :mod:`wove.testing.contract`).
* :class:`WorkerServiceContract` — the worker-service contract kit every worker service
  runs against itself (see :mod:`wove.testing.services`).
* :class:`WorkerProcess` — ``wove worker SERVICE`` in a subprocess on 127.0.0.1.
* :func:`collect_events`, :func:`run_async` — helpers for tests that speak frames.
* :mod:`wove.testing.tasks` — task functions importable in every worker (``echo``,
  ``add``, ``fail``, ``sleep``, ``blocking_sleep``, ``pid``, ``write_marker``, ``burn``,
  ``nested``, ``blob``, ``record``, ``fail_in_helper``, ``raise_unrebuildable``, ``chatty``,
  ``chatty_sync``, ``ContractTaskError``), so they are pickled by reference.

Importing :mod:`wove.testing.tasks` (what a worker does to unpickle such a task) does not
import pytest: the kits are loaded on first access to their names.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import tasks

if TYPE_CHECKING:
    from .contract import ExecutorContract, WorkerProcess, collect_events, run_async
    from .services import WorkerServiceContract

__all__ = ["ExecutorContract", "WorkerProcess", "WorkerServiceContract", "collect_events", "run_async", "tasks"]

# name -> the submodule that defines it (imported on first access: both import pytest)
_KIT = {
    "ExecutorContract": ".contract",
    "WorkerProcess": ".contract",
    "collect_events": ".contract",
    "run_async": ".contract",
    "WorkerServiceContract": ".services",
}


def __getattr__(name: str) -> Any:
    if name not in _KIT:
        raise AttributeError(f"module 'wove.testing' has no attribute {name!r}")
    value = getattr(importlib.import_module(_KIT[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_KIT))
