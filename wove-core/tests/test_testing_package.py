"""wove.testing: public kits and task helpers; its tasks import without pytest."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_importing_the_tasks_does_not_import_pytest() -> None:
    code = ("import sys, wove.testing.tasks as t; from wove.testing import tasks; "
            "print(tasks is t, 'pytest' in sys.modules, t.add(2, 3))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["True", "False", "5"]


def test_the_kits_are_public_names_of_the_package() -> None:
    import wove.testing
    from wove.testing.contract import ExecutorContract, WorkerProcess, collect_events, run_async
    from wove.testing.services import WorkerServiceContract

    assert wove.testing.ExecutorContract is ExecutorContract
    assert wove.testing.WorkerProcess is WorkerProcess
    assert wove.testing.collect_events is collect_events and wove.testing.run_async is run_async
    assert wove.testing.WorkerServiceContract is WorkerServiceContract
    assert set(wove.testing.__all__) <= set(dir(wove.testing))
    with pytest.raises(AttributeError, match="no attribute 'ExecutorContrakt'"):
        _ = wove.testing.ExecutorContrakt  # type: ignore[attr-defined]
