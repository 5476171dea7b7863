"""The calling API: submit/RunFuture, as_completed, gather, map/starmap, progress, call_with
checks, on the local executor and on real stdio worker processes."""

from __future__ import annotations

import asyncio
import itertools
import os
import pty
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from wove.environment import (
    DeliveryTimeoutError,
    ExecutorRuntime,
    MapProgress,
    RunFuture,
    as_completed,
    gather,
)
from wove.errors import ConfigError
from wove.testing import tasks

EXECUTORS = ["local", "stdio"]


@pytest.fixture(params=EXECUTORS)
def definition(request: pytest.FixtureRequest) -> dict[str, Any]:
    return {"executor": request.param}


def runtime_for(definition: dict[str, Any], **settings: Any) -> ExecutorRuntime:
    return ExecutorRuntime({"env": {**definition, **settings}}, {})


async def test_submit_returns_a_future_at_once(definition: dict[str, Any]) -> None:
    async with runtime_for(definition) as runtime:
        future = runtime.submit("env", tasks.sleep, 0.3)
        assert isinstance(future, RunFuture)
        assert not future.done()
        assert future.run_id.startswith("sleep:") and future.environment == "env"
        with pytest.raises(asyncio.InvalidStateError, match="has not finished yet"):
            future.result()
        with pytest.raises(asyncio.InvalidStateError):
            future.exception()
        called: list[RunFuture[str]] = []
        future.add_done_callback(called.append)
        assert await future == "slept"
        await asyncio.sleep(0)
        assert future.done() and not future.cancelled()
        assert future.result() == "slept" and future.exception() is None
        assert called == [future]
        assert "finished" in repr(future)


async def test_future_of_a_failing_task(definition: dict[str, Any]) -> None:
    async with runtime_for(definition) as runtime:
        future = runtime.submit("env", tasks.fail, "broken on purpose")
        with pytest.raises(tasks.ContractTaskError, match="broken on purpose"):
            await future
        assert isinstance(future.exception(), tasks.ContractTaskError)
        with pytest.raises(tasks.ContractTaskError):
            future.result()


@pytest.mark.parametrize("cancel_mode", ["best_effort", "require_ack"])
async def test_cancel_sends_cancel_task(definition: dict[str, Any], cancel_mode: str, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    async with runtime_for(definition, delivery_cancel_mode=cancel_mode) as runtime:
        future = runtime.submit("env", tasks.sleep, 1.0, str(marker))
        await asyncio.sleep(0.3)  # the run is executing on the worker
        assert future.cancel()
        with pytest.raises(asyncio.CancelledError):
            await future
        assert future.cancelled() and future.done()
        with pytest.raises(asyncio.CancelledError):
            future.result()
        await asyncio.sleep(1.2)
        assert not marker.exists(), "the worker must have cancelled the run"
        assert await runtime.call("env", tasks.add, 1, 2) == 3


async def test_submit_checks_at_the_call() -> None:
    async with runtime_for({"executor": "local"}) as runtime:
        with pytest.raises(NameError, match="unknown environment 'elsewhere'"):
            runtime.submit("elsewhere", tasks.add, 1, 2)
        with pytest.raises(ConfigError, match="Did you mean delivery_timeout"):
            runtime.submit_with("env", tasks.add, (1, 2), delivery_timout=1)  # type: ignore[arg-type]
        assert await runtime.submit_with("env", tasks.add, (1, 2), delivery_timeout=5) == 3


async def test_as_completed_both_shapes(definition: dict[str, Any]) -> None:
    async with runtime_for(definition) as runtime:
        slow = runtime.submit("env", tasks.sleep, 30.0)
        fast = runtime.submit("env", tasks.add, 1, 1)
        iterator = as_completed([slow, fast])
        first = await iterator.__anext__()
        assert first is fast and first.result() == 2
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await _next_result(iterator)

        futures = [runtime.submit("env", tasks.add, i, 0) for i in range(5)]
        results = [await next_result for next_result in as_completed(futures)]
        assert sorted(results) == list(range(5))
        seen = [future async for future in as_completed(futures)]  # all done already
        assert sorted(map(id, seen)) == sorted(map(id, futures))


async def _next_result(iterator: Any) -> Any:
    future = await iterator.__anext__()
    return future.result()


async def test_as_completed_timeout() -> None:
    async with runtime_for({"executor": "local"}) as runtime:
        slow = runtime.submit("env", tasks.sleep, 30.0)
        with pytest.raises(asyncio.TimeoutError, match=r"1 of 1 futures did not finish within timeout=0.2s"):
            async for _ in as_completed([slow], timeout=0.2):
                pass
        assert not slow.done(), "a timeout leaves the runs running"
        slow.cancel()


async def test_gather(definition: dict[str, Any]) -> None:
    async with runtime_for(definition) as runtime:
        assert await gather(*(runtime.submit("env", tasks.add, i, i) for i in range(10))) == [2 * i for i in range(10)]
        mixed = await gather(runtime.submit("env", tasks.add, 1, 1), runtime.submit("env", tasks.fail, "x"),
                             return_exceptions=True)
        assert mixed[0] == 2 and isinstance(mixed[1], tasks.ContractTaskError)
        with pytest.raises(tasks.ContractTaskError):
            await gather(runtime.submit("env", tasks.fail, "y"))


async def test_call_is_await_submit(definition: dict[str, Any]) -> None:
    async with runtime_for(definition) as runtime:
        assert await runtime.call("env", tasks.add, 2, 3) == await runtime.submit("env", tasks.add, 2, 3) == 5


# -- map ------------------------------------------------------------------------------
async def test_map_ordered_unordered_starmap(definition: dict[str, Any]) -> None:
    async with runtime_for(definition) as runtime:
        assert [x async for x in runtime.map("env", tasks.add, range(50), range(50))] == [2 * i for i in range(50)]
        unordered = [x async for x in runtime.map("env", tasks.echo, range(50), ordered=False, buffersize=7)]
        assert sorted(unordered) == list(range(50))
        pairs = [(i, 1) for i in range(20)]
        assert [x async for x in runtime.starmap("env", tasks.add, pairs)] == [i + 1 for i in range(20)]


async def test_map_yields_as_completed_when_unordered(definition: dict[str, Any]) -> None:
    async with runtime_for(definition) as runtime:
        results = runtime.map("env", tasks.sleep, [30.0, 0.0], ordered=False)
        async with results:
            assert await results.__anext__() == "slept"  # the short one, while the long one runs


async def test_map_is_lazy_and_bounded(definition: dict[str, Any]) -> None:
    pulled = 0

    def numbers() -> Any:
        nonlocal pulled
        for i in itertools.count():
            pulled += 1
            yield i

    seen: list[MapProgress] = []
    async with runtime_for(definition) as runtime:
        got = 0
        async for value in runtime.map("env", tasks.echo, numbers(), buffersize=4, progress=seen.append):
            assert value == got
            got += 1
            if got == 40:
                break
    assert pulled <= 40 + 4, f"pulled {pulled} items for 40 results with buffersize=4"
    assert max(p.in_flight for p in seen) <= 4
    assert all(p.total is None for p in seen), "an infinite input never has a total"


async def test_map_async_input_and_async_generators(definition: dict[str, Any]) -> None:
    async def numbers(n: int) -> AsyncIterator[int]:
        for i in range(n):
            await asyncio.sleep(0)
            yield i

    async with runtime_for(definition) as runtime:
        assert [x async for x in runtime.map("env", tasks.add, numbers(30), range(100))] == [2 * i for i in range(30)]
        assert [x async for x in runtime.starmap("env", tasks.add, _pairs(10))] == [i + 1 for i in range(10)]


async def _pairs(n: int) -> AsyncIterator[tuple[int, int]]:
    for i in range(n):
        yield (i, 1)


async def test_map_buffersize_defaults_to_delivery_max_in_flight() -> None:
    seen: list[MapProgress] = []
    async with runtime_for({"executor": "local"}, delivery_max_in_flight=3) as runtime:
        results = [x async for x in runtime.map("env", tasks.sleep, [0.01] * 20, progress=seen.append)]
    assert results == ["slept"] * 20
    # reported as each run finishes: the others still in flight, at most buffersize - 1 (not 19)
    assert 1 <= max(p.in_flight for p in seen) <= 2
    async with runtime_for({"executor": "local"}) as runtime:
        with pytest.raises(ConfigError, match=r"buffersize must be a positive integer.*got 0"):
            runtime.map("env", tasks.echo, [1], buffersize=0)
        with pytest.raises(NameError, match="unknown environment 'nowhere'"):
            runtime.map("nowhere", tasks.echo, [1])


async def test_map_return_exceptions_and_raising(definition: dict[str, Any], tmp_path: Path) -> None:
    async with runtime_for(definition) as runtime:
        messages = ["a", "b", "c"]
        out = [x async for x in runtime.map("env", tasks.fail, messages, return_exceptions=True)]
        assert [type(x) for x in out] == [tasks.ContractTaskError] * 3 and [str(x) for x in out] == messages

        marker = tmp_path / "marker"
        with pytest.raises(tasks.ContractTaskError, match="first"):
            async for _ in runtime.starmap("env", _fail_or_sleep, [("first", None), (None, str(marker))] * 3):
                pass
        await asyncio.sleep(1.3)
        assert not marker.exists(), "the map's error cancels the runs in flight"


async def _fail_or_sleep(message: str | None, marker: str | None) -> str:
    if message:
        raise tasks.ContractTaskError(message)
    return await tasks.sleep(1.0, marker)


@pytest.mark.parametrize("how", ["break", "exception", "cancel_in_body", "cancel_while_waiting", "async_with"])
async def test_leaving_map_early_cancels_in_flight(definition: dict[str, Any], tmp_path: Path, how: str) -> None:
    markers = [str(tmp_path / f"m{i}") for i in range(4)]
    first = 30.0 if how == "cancel_while_waiting" else 0.0
    seconds, marks = [first, 1.0, 1.0, 1.0], [None, *markers[1:]]
    async with runtime_for(definition) as runtime:

        async def consume() -> None:
            if how == "async_with":
                async with runtime.map("env", tasks.sleep, seconds, marks) as results:
                    async for _ in results:
                        break
                return
            async for _ in runtime.map("env", tasks.sleep, seconds, marks):
                if how == "break":
                    break
                if how == "exception":
                    raise LookupError("stop")
                if how == "cancel_in_body":
                    await asyncio.sleep(30)

        if how.startswith("cancel"):
            consumer = asyncio.ensure_future(consume())
            await asyncio.sleep(0.4)
            consumer.cancel()
            with pytest.raises(asyncio.CancelledError):
                await consumer
        elif how == "exception":
            with pytest.raises(LookupError):
                await consume()
        else:
            await consume()
        await asyncio.sleep(1.3)
        assert [m for m in markers if Path(m).exists()] == [], "runs in flight must be cancelled"


async def test_map_progress_callable(definition: dict[str, Any]) -> None:
    seen: list[MapProgress] = []
    async with runtime_for(definition) as runtime:
        items = [str(i) if i % 5 else "" for i in range(30)]
        out = [x async for x in runtime.map("env", _fail_if_empty, items, return_exceptions=True,
                                            buffersize=4, progress=seen.append)]
    assert len(out) == 30
    final = seen[-1]
    assert final.finished and [p.finished for p in seen].count(True) == 1
    assert (final.done, final.failed, final.in_flight, final.total) == (24, 6, 0, 30)
    assert seen[0].total is None, "total is None until the input is exhausted"
    done = [p.done + p.failed for p in seen]
    assert done == sorted(done), "counts only grow"


async def _fail_if_empty(text: str) -> str:
    if not text:
        raise ValueError("empty")
    return text


async def test_progress_true_prints_nothing_when_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    async with runtime_for({"executor": "local"}) as runtime:
        assert [x async for x in runtime.map("env", tasks.echo, range(10), progress=True)] == list(range(10))
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def run_with_stderr_on_a_terminal(command: list[str]) -> tuple[subprocess.Popen[str], str, str]:
    """Run ``command`` with stderr on a pseudo-terminal; return it, its stdout and the terminal's text."""
    leader, follower = pty.openpty()
    chunks: list[bytes] = []

    def drain() -> None:  # read while the child writes: a full pty would block it
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO once the child's end is closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=follower, text=True)
    os.close(follower)
    stdout, _ = proc.communicate(timeout=60)
    reader.join(10)
    os.close(leader)
    return proc, stdout, b"".join(chunks).decode(errors="replace")


def test_progress_true_draws_a_bar_on_a_terminal() -> None:
    script = textwrap.dedent("""
        import asyncio
        from wove.environment import ExecutorRuntime
        from wove.testing import tasks

        async def main():
            async with ExecutorRuntime({"env": {"executor": "local"}}, {}) as runtime:
                out = [x async for x in runtime.map("env", tasks.fail, ["a"] * 3, return_exceptions=True,
                                                     progress=True)]
                out += [x async for x in runtime.map("env", tasks.echo, range(200), progress=True)]
            print("results", len(out))

        asyncio.run(main())
    """)
    proc, stdout, terminal = run_with_stderr_on_a_terminal([sys.executable, "-c", script])
    assert proc.returncode == 0 and "results 203" in stdout
    assert "failed=3" in terminal and "in_flight=0" in terminal, terminal
    assert "200/200" in terminal and "run/s" in terminal, terminal


def test_wove_demo_shows_progress_on_a_terminal() -> None:
    proc, stdout, terminal = run_with_stderr_on_a_terminal(
        [sys.executable, "-m", "wove.cli", "demo", "--only", "local,stdio", "--tasks", "300"])
    assert proc.returncode == 0, stdout + terminal
    assert "300/300" in stdout, "the table: every result correct"
    assert "_demo_square on local" in terminal and "_demo_square on stdio" in terminal, terminal
    assert "300/300" in terminal, terminal


def test_progress_true_without_tqdm_says_what_to_install() -> None:
    script = textwrap.dedent("""
        import asyncio, sys
        sys.modules["tqdm"] = None
        from wove.environment import ExecutorRuntime

        async def main():
            async with ExecutorRuntime({"env": {"executor": "local"}}, {}) as runtime:
                try:
                    runtime.map("env", abs, [1], progress=True)
                except ImportError as exc:
                    print(exc)

        asyncio.run(main())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert 'pip install "wove-core[progress]"' in out.stdout, out.stdout + out.stderr
    assert "progress=<callable>" in out.stdout


# -- call_with keywords ---------------------------------------------------------------------
@pytest.mark.parametrize(("settings", "message"), [
    ({"delivery_timeout": "soon"}, r"delivery_timeout must be a positive number of seconds, got 'soon' \(str\)"),
    ({"delivery_timout": 1}, r"unknown keyword delivery_timout=1\. Did you mean delivery_timeout\?"),
    ({"delivery_heartbeat_seconds": -1}, r"delivery_heartbeat_seconds must be a positive number.*got -1"),
    ({"delivery_cancel_mode": "eventually"}, r"delivery_cancel_mode must be one of 'best_effort', 'require_ack'"),
    ({"delivery_orphan_policy": "shrug"}, r"delivery_orphan_policy must be one of"),
    ({"delivery_max_in_flight": 2.5}, r"delivery_max_in_flight must be a positive integer, got 2.5"),
    ({"delivery_idempotency_key": 12}, r"delivery_idempotency_key must be a string.*got 12"),
    ({"task_nam": "x"}, r"Did you mean task_name\?"),
])
async def test_call_with_checks_its_keywords(settings: dict[str, Any], message: str) -> None:
    async with runtime_for({"executor": "local"}) as runtime:
        with pytest.raises(ConfigError, match=message) as raised:
            await runtime.call_with("env", tasks.add, (1, 2), **settings)
        assert "task 'add' in environment 'env'" in str(raised.value)


async def test_delivery_timeout_error_is_a_timeout_error(definition: dict[str, Any]) -> None:
    async with runtime_for(definition) as runtime:
        with pytest.raises(TimeoutError, match=r"delivery_timeout=0\.3s") as raised:
            await runtime.call_with("env", tasks.sleep, (5.0,), delivery_timeout=0.3)
        assert isinstance(raised.value, DeliveryTimeoutError)
