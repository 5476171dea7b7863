"""What the executor does with this process's Ray connection (each case in a fresh subprocess:
``ray.init`` connects a process once)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from typing import Any

import pytest

pytestmark = [pytest.mark.timeout(180), pytest.mark.integration]


def _run(script: str, *args: str, timeout: float = 150) -> dict[str, Any]:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                                                  "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"})
    assert result.returncode == 0, result.stdout + result.stderr
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_start_errors_name_the_problem(ray_address: str) -> None:
    out = _run("""
        import asyncio, json, sys, time
        from wove.environment import ExecutorRuntime

        async def attempt(config):
            started = time.monotonic()
            try:
                async with ExecutorRuntime({"r": {"executor": "ray", "executor_config": config}}, {}):
                    return "started", 0.0
            except Exception as exc:
                return f"{type(exc).__name__}: {exc}", time.monotonic() - started

        async def main():
            out = {}
            out["init_false"], _ = await attempt({"init": False})
            out["unreachable"], out["unreachable_seconds"] = await attempt(
                {"address": f"127.0.0.1:{sys.argv[1]}", "connect_timeout": 0.5})
            import ray
            out["initialized_after_errors"] = ray.is_initialized()
            ray.init(address=sys.argv[2], logging_level="WARNING")
            out["other_address"], _ = await attempt({"address": f"127.0.0.1:{sys.argv[1]}"})
            out["still_connected"] = ray.is_initialized()
            print(json.dumps(out))

        asyncio.run(main())
    """, str(_closed_port()), ray_address)
    assert out["init_false"].startswith("RuntimeError: ray executor: Ray is not initialized in this process and "
                                        "executor_config.init is false")
    assert out["unreachable"].startswith("OSError: ray executor cannot reach the Ray head at 127.0.0.1:")
    assert "connect_timeout=0.5 s" in out["unreachable"] and out["unreachable_seconds"] < 20
    assert out["initialized_after_errors"] is False
    assert out["other_address"].startswith("ConfigError: ray executor: Ray is already initialized in this "
                                           f"process, connected to the cluster at {ray_address}")
    assert out["still_connected"] is True  # the program's own connection is left alone


def test_the_executor_connects_to_an_address_and_disconnects_at_stop(ray_address: str) -> None:
    out = _run("""
        import asyncio, json, os, sys
        import ray
        from wove.environment import ExecutorRuntime
        from wove.testing import tasks

        async def main():
            config = {"address": sys.argv[1]}
            environments = {"a": {"executor": "ray", "executor_config": config},
                            "b": {"executor": "ray", "executor_config": {**config, "force_cancel": True}}}
            async with ExecutorRuntime(environments, {}) as runtime:
                connected = ray.get_runtime_context().gcs_address
                results = await asyncio.gather(runtime.call("a", tasks.add, 1, 2), runtime.call("b", tasks.pid))
            print(json.dumps({"connected": connected, "results": results, "me": os.getpid(),
                              "after": ray.is_initialized()}))

        asyncio.run(main())
    """, ray_address)
    assert out["connected"] == ray_address
    assert out["results"][0] == 3 and out["results"][1] != out["me"]
    assert out["after"] is False  # the executor opened the connection, so it closed it


def test_without_address_ray_init_starts_a_local_ray_and_stops_it() -> None:
    temp_dir = tempfile.mkdtemp(prefix="wove-ray-")  # short: Ray's socket paths live under it
    try:
        out = _run(LOCAL_RAY, temp_dir)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert out["cpus"] == 1 and out["added"] == 42 and out["pid"] != out["me"]
    assert out["after"] is False


LOCAL_RAY = """
        import asyncio, json, os, sys
        import ray
        from wove.environment import ExecutorRuntime
        from wove.testing import tasks

        async def main():
            config = {"init_options": {"num_cpus": 1, "include_dashboard": False, "logging_level": "WARNING",
                                       "_temp_dir": sys.argv[1]}}
            async with ExecutorRuntime({"r": {"executor": "ray", "executor_config": config}}, {}) as runtime:
                resources = ray.cluster_resources()
                pid = await runtime.call("r", tasks.pid)
                added = await runtime.call("r", tasks.add, 20, 22)
            print(json.dumps({"cpus": resources.get("CPU"), "pid": pid, "me": os.getpid(), "added": added,
                              "after": ray.is_initialized()}))

        asyncio.run(main())
"""


HEAD_DEATH = """
        import asyncio, json, sys, time
        from wove.environment import ExecutorRuntime
        from wove.testing import tasks

        async def main():
            config = {"address": sys.argv[1]}
            async with ExecutorRuntime({"r": {"executor": "ray", "executor_config": config}}, {}) as runtime:
                # one CPU: the first run sleeps on the worker, the second waits in this process's queue
                calls = [asyncio.ensure_future(runtime.call_with("r", tasks.sleep, (120,),
                                                                 delivery_orphan_policy="requeue"))
                         for _ in range(2)]
                await asyncio.sleep(2.0)
                print("running", flush=True)
                sys.stdin.readline()  # the test kills the head, then writes a line
                started = time.monotonic()
                outcomes = await asyncio.gather(*calls, return_exceptions=True)
                seconds = time.monotonic() - started
            print(json.dumps({"errors": [f"{type(o).__name__}: {o}" for o in outcomes], "seconds": seconds}))

        asyncio.run(main())
"""


@pytest.mark.timeout(240)
def test_runs_end_naming_the_head_when_the_cluster_dies() -> None:
    """Under requeue too: a run on a dead cluster is not re-submitted, and a queued run does
    not wait for Ray to give up on the head (60 s, after which Ray ends the process)."""
    from .ray_cluster import start_ray_head

    head = start_ray_head(num_cpus=1)
    try:
        proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HEAD_DEATH), head.address],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline()
        assert line.strip() == "running", line + proc.stderr.read() if proc.poll() is not None else line
        os.killpg(head.proc.pid, signal.SIGKILL)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=60)
    finally:
        head.stop()
    assert proc.returncode == 0, out + err[-4000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert len(result["errors"]) == 2 and result["seconds"] < 30
    for error in result["errors"]:
        assert error.startswith("EnvironmentExecutionError: ray executor: the head of the Ray cluster at "
                                f"{head.address} no longer answers")
