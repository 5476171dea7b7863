"""Interop with the reference Wove 2.0.3 (installed in a throwaway venv), both directions."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from wove.environment import ExecutorRuntime
from wove.testing import tasks

pytestmark = [pytest.mark.integration, pytest.mark.interop]


@pytest.fixture(scope="module")
def wove2(wove2_python: Path) -> Path:  # type: ignore[no-untyped-def]
    return wove2_python


async def test_our_executor_drives_the_wove2_stdio_worker(wove2: Path) -> None:
    """(a) Our executor with ``command`` = Wove 2.0.3's ``python -m wove.stdio_worker``."""
    config = {"command": [str(wove2), "-m", "wove.stdio_worker"], "processes": 2}

    def boom(message: str) -> None:
        raise KeyError(message)

    async with ExecutorRuntime({"w": {"executor": "stdio", "executor_config": config}}) as rt:
        # tasks travel by value (closures/lambdas): wove-core is not importable over there
        assert await rt.call("w", lambda a, b: a + b, 2, 3) == 5
        import wove as ours

        pid = await rt.call("w", lambda: __import__("os").getpid())
        assert isinstance(pid, int)
        version = await rt.call("w", lambda: __import__("importlib.metadata").metadata.version("wove"))
        assert version == "2.0.3" != ours.__version__
        with pytest.raises(KeyError, match="missing on purpose"):
            await rt.call("w", boom, "missing on purpose")
        results = [await rt.call("w", lambda i=i: i * i) for i in range(5)]
        assert results == [0, 1, 4, 9, 16]


SCRIPT = textwrap.dedent("""
    import asyncio, json, sys
    from wove.environment import ExecutorRuntime

    async def main():
        command = json.loads(sys.argv[1])
        rt = ExecutorRuntime({"w": {"executor": "stdio", "executor_config": {"command": command}}}, {})
        await rt.start()
        out = {}
        try:
            async def call(func, **kwargs):
                return await rt.run_task(task_name=getattr(func, "__name__", "task"), task_func=func,
                                         task_args=kwargs, task_info={"environment": "w"})
            out["sum"] = await call(lambda a, b: a + b, a=2, b=40)
            out["many"] = await asyncio.gather(*(call(lambda i: i * 2, i=i) for i in range(20)))
            out["worker"] = await call(lambda: __import__("wove_executor_stdio").__name__)
            out["heartbeat"] = await rt.run_task(
                task_name="nap", task_func=lambda: __import__("time").sleep(0.6) or "rested",
                task_args={}, task_info={"environment": "w", "delivery_heartbeat_seconds": 0.9})
            def boom():
                raise ValueError("raised in our worker")
            try:
                await call(boom)
            except ValueError as exc:
                out["error"] = str(exc)
        finally:
            await rt.stop()
        print(json.dumps(out))

    asyncio.run(main())
""")


def test_wove2_stdio_executor_drives_our_worker(wove2: Path, tmp_path: Path) -> None:
    """(b) Wove 2.0.3's stdio executor with ``command`` = ``python -m wove_executor_stdio``."""
    script = tmp_path / "wove2_client.py"
    script.write_text(SCRIPT)
    command = [sys.executable, "-m", "wove_executor_stdio"]
    proc = subprocess.run([str(wove2), str(script), json.dumps(command)], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {
        "sum": 42,
        "many": [i * 2 for i in range(20)],
        "worker": "wove_executor_stdio",
        "heartbeat": "rested",
        "error": "raised in our worker",
    }


async def test_contract_task_through_both_peers_keeps_its_exception_type(wove2: Path) -> None:
    """A task error raised over there comes back as the task's own exception here."""
    config = {"command": [str(wove2), "-m", "wove.stdio_worker"]}
    async with ExecutorRuntime({"w": {"executor": "stdio", "executor_config": config}}) as rt:
        with pytest.raises(ZeroDivisionError):
            await rt.call("w", lambda: 1 / 0)
        assert await rt.call("w", tasks.echo.__wrapped__ if hasattr(tasks.echo, "__wrapped__") else (lambda v: v), 7) == 7
