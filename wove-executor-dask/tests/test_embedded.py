"""The embedded LocalCluster: no dashboard port, and one clear error for a script without a main guard."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from wove.environment import ExecutorRuntime
from wove.testing import tasks

pytestmark = pytest.mark.timeout(90)

DASHBOARD_PORT = 8787


def _listening_ports() -> set[int]:
    import psutil

    process = psutil.Process()
    connections = process.net_connections(kind="inet") if hasattr(process, "net_connections") else process.connections()
    return {conn.laddr.port for conn in connections if conn.status == psutil.CONN_LISTEN}


@pytest.mark.parametrize("processes", [False, True])
async def test_embedded_cluster_does_not_bind_the_dashboard_port(processes: bool) -> None:
    from wove_executor_dask import build_dask_executor

    executor = build_dask_executor()
    config = {"n_workers": 1, "threads_per_worker": 1, "processes": processes}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with ExecutorRuntime({"dask": {"executor": executor, "executor_config": config}}, {}) as runtime:
            assert await runtime.call("dask", tasks.add, 1, 2) == 3
            ports = _listening_ports()
            assert executor.adapter is not None
            scheduler = executor.adapter.cluster.scheduler  # type: ignore[attr-defined]
            http_port = scheduler.http_server.port
    # Either 8787 was free and our cluster must not have taken it, or something else holds
    # it and Dask must not have tried it (it warns "Port 8787 is already in use" when it does).
    assert DASHBOARD_PORT not in ports and http_port != DASHBOARD_PORT
    assert not [w for w in caught if str(DASHBOARD_PORT) in str(w.message)], [str(w.message) for w in caught]
    assert "dashboard" not in {name for name in getattr(scheduler, "plugins", {})}


def _script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "job.py"
    path.write_text(textwrap.dedent(body))
    return path


def _run(path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=80, env=env,
                          cwd=path.parent)


_RUNTIME = """
    import asyncio
    from wove.environment import ExecutorRuntime

    def add(a, b):
        return a + b

    async def main():
        config = {"n_workers": 2, "threads_per_worker": 1, "processes": True}
        async with ExecutorRuntime({"d": {"executor": "dask", "executor_config": config}}, {}) as runtime:
            print("result", await runtime.call("d", add, 40, 2))
"""


def test_a_script_without_a_main_guard_gets_one_clear_error(tmp_path: Path) -> None:
    path = _script(tmp_path, _RUNTIME + "\n    asyncio.run(main())\n")
    line = path.read_text().splitlines().index("asyncio.run(main())") + 1
    proc = _run(path)
    assert proc.returncode != 0
    stderr = proc.stderr
    assert stderr.count("MainGuardError: dask executor: the embedded LocalCluster") == 1, stderr  # once
    assert 'if __name__ == "__main__":\n        asyncio.run(main())' in stderr  # what to add
    assert f"job.py, line {line} " in stderr and "processes to false" in stderr
    assert stderr.count("Traceback") <= 1, stderr
    assert "bootstrapping phase" not in stderr and "result" not in proc.stdout


def test_a_script_that_starts_the_runtime_at_import_through_a_helper_is_caught(tmp_path: Path) -> None:
    (tmp_path / "helper.py").write_text(textwrap.dedent(_RUNTIME + "\n    asyncio.run(main())\n"))
    proc = _run(_script(tmp_path, """
        import helper  # starts the runtime while the main script is imported

        if __name__ == "__main__":
            print("main done")
    """))
    assert proc.returncode != 0
    assert proc.stderr.count("MainGuardError: dask executor") == 1, proc.stderr
    assert "job.py, line 2" in proc.stderr
    assert "bootstrapping phase" not in proc.stderr


def test_a_guarded_script_runs(tmp_path: Path) -> None:
    proc = _run(_script(tmp_path, _RUNTIME + "\n    if __name__ == '__main__':\n        asyncio.run(main())\n"))
    assert proc.returncode == 0, proc.stderr
    assert "result 42" in proc.stdout
