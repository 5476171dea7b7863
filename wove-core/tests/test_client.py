"""wove.environment.Client: the runtime from synchronous code, on local and real stdio workers."""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from wove.environment import Client, ClientExecutor, MapProgress
from wove.testing import tasks


@pytest.fixture(params=["local", "stdio"])
def client(request: pytest.FixtureRequest) -> Any:
    with Client({"env": {"executor": request.param}}) as running:
        yield running


def test_call_submit_and_as_completed(client: Client) -> None:
    assert client.call("env", tasks.add, 2, 3) == 5
    assert client.call("env", tasks.echo, {"k": [1]}) == {"k": [1]}
    futures = [client.submit("env", tasks.add, i, 1) for i in range(10)]
    assert all(isinstance(f, concurrent.futures.Future) for f in futures)
    assert sorted(f.result() for f in concurrent.futures.as_completed(futures, timeout=30)) == list(range(1, 11))
    with pytest.raises(tasks.ContractTaskError, match="sync side"):
        client.call("env", tasks.fail, "sync side")
    failing = client.submit("env", tasks.fail, "as a future")
    assert isinstance(failing.exception(timeout=30), tasks.ContractTaskError)
    assert client.call_with("env", tasks.add, (1, 1), delivery_timeout=10) == 2


def test_cancelling_a_future_cancels_the_run(client: Client, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    future = client.submit("env", tasks.sleep, 1.0, str(marker))
    time.sleep(0.3)
    assert future.cancel()
    with pytest.raises(concurrent.futures.CancelledError):
        future.result()
    time.sleep(1.2)
    assert not marker.exists()


def test_map_is_a_plain_iterator(client: Client) -> None:
    results = client.map("env", tasks.add, range(100), range(100))
    assert not hasattr(results, "__anext__")
    assert list(results) == [2 * i for i in range(100)]
    assert sorted(client.map("env", tasks.echo, range(30), ordered=False, buffersize=5)) == list(range(30))
    assert list(client.starmap("env", tasks.add, [(1, 2), (3, 4)])) == [3, 7]
    out = list(client.map("env", tasks.fail, ["x", "y"], return_exceptions=True))
    assert [str(e) for e in out] == ["x", "y"]
    with pytest.raises(tasks.ContractTaskError, match="z"):
        list(client.map("env", tasks.fail, ["z"]))
    seen: list[MapProgress] = []
    assert len(list(client.map("env", tasks.echo, range(20), progress=seen.append))) == 20
    assert seen[-1].finished and seen[-1].done == 20 and seen[-1].total == 20


def test_map_left_early_cancels_in_flight(client: Client, tmp_path: Path) -> None:
    markers = [str(tmp_path / f"m{i}") for i in range(3)]
    for _ in client.map("env", tasks.sleep, [0.0, 1.0, 1.0], [None, *markers[1:]]):
        break
    time.sleep(1.3)
    assert [m for m in markers if Path(m).exists()] == []


def test_executor_is_a_concurrent_futures_executor(client: Client) -> None:
    with client.executor("env") as pool:
        assert isinstance(pool, concurrent.futures.Executor) and isinstance(pool, ClientExecutor)
        assert list(pool.map(tasks.add, range(10), range(10))) == [2 * i for i in range(10)]
        futures = [pool.submit(tasks.add, i, 0) for i in range(5)]
        assert sorted(f.result() for f in concurrent.futures.as_completed(futures)) == list(range(5))

        async def from_asyncio() -> list[int]:
            loop = asyncio.get_running_loop()
            return list(await asyncio.gather(*(loop.run_in_executor(pool, tasks.add, i, 100) for i in range(5))))

        assert asyncio.run(from_asyncio()) == [100, 101, 102, 103, 104]
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        pool.submit(tasks.add, 1, 1)
    assert client.call("env", tasks.add, 1, 1) == 2, "shutting the executor down leaves the client running"


def test_executor_shutdown_cancel_futures(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    with Client({"env": {"executor": "local"}}) as client:
        pool = client.executor("env")
        future = pool.submit(tasks.sleep, 1.0, str(marker))
        time.sleep(0.2)
        pool.shutdown(wait=True, cancel_futures=True)
        assert future.cancelled()
        time.sleep(1.2)
        assert not marker.exists()


def test_errors_before_start_and_unknown_environments() -> None:
    client = Client({"env": {"executor": "local"}})
    with pytest.raises(RuntimeError, match="not running"):
        client.call("env", tasks.add, 1, 2)
    with client, pytest.raises(NameError, match=r"unknown environment 'other'\. Known environments: env"):
        client.submit("other", tasks.add, 1, 2)
    with pytest.raises(RuntimeError, match="not running"):
        client.submit("env", tasks.add, 1, 2)
    assert not [t for t in threading.enumerate() if t.name == "wove-client"], "the loop thread has ended"


def test_leaving_the_block_stops_the_runtime_and_the_thread(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    with Client({"env": {"executor": "stdio"}}) as client:
        pending = client.submit("env", tasks.sleep, 1.0, str(marker))
        time.sleep(0.3)
    assert pending.cancelled() or isinstance(pending.exception(timeout=10), Exception)
    time.sleep(1.2)
    assert not marker.exists(), "pending runs end by their orphan policy (cancel)"
    assert not [t for t in threading.enumerate() if t.name == "wove-client"]


def test_a_failing_start_raises_and_leaves_no_thread() -> None:
    with pytest.raises(ValueError, match="nonexistent"), Client({"env": {"executor": "nonexistent"}}):
        pass
    assert not [t for t in threading.enumerate() if t.name == "wove-client"]


SCRIPT = textwrap.dedent("""
    import sys
    from wove.environment import Client
    from wove.testing import tasks

    with Client({"env": {"executor": "stdio"}}) as client:
        client.call("env", tasks.add, 1, 1)
        print("ready", flush=True)
        if sys.argv[1] == "map":
            for _ in client.map("env", tasks.sleep, [5.0] * 3, [sys.argv[2] + str(i) for i in range(3)]):
                pass
        else:
            client.call("env", tasks.sleep, 5.0, sys.argv[2])
""")


@pytest.mark.parametrize("mode", ["call", "map"])
def test_ctrl_c_cancels_and_raises_keyboard_interrupt(tmp_path: Path, mode: str) -> None:
    marker = str(tmp_path / "marker")
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, mode, marker], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.5)  # the runs are executing on the worker
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert stderr.rstrip().endswith("KeyboardInterrupt"), stderr
    frames = [line for line in stderr.splitlines() if line.strip().startswith('File "')]
    internals = [line for line in frames if "/wove/" in line and "client.py" not in line]
    assert internals == [], f"no traceback from wove's internals: {stderr}"
    assert "Exception in thread" not in stderr and "Task was destroyed" not in stderr, stderr
    time.sleep(5.2)
    assert not list(tmp_path.glob("marker*")), "the runs in flight were cancelled"


def test_the_interpreter_exits_without_close() -> None:
    script = textwrap.dedent("""
        from wove.environment import Client
        from wove.testing import tasks
        client = Client({"env": {"executor": "stdio"}})
        client.start()
        print(client.call("env", tasks.add, 20, 22))
        client.submit("env", tasks.sleep, 60.0)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "42"
