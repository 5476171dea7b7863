"""A contract test kit every executor distribution runs against its own executor.

Subclass :class:`ExecutorContract` in a pytest test module and provide the executor's
name (and config, or a whole environment definition, for example one pointing at a
worker service a fixture started)::

    from wove.testing import ExecutorContract

    class TestGrpcContract(ExecutorContract):
        @pytest.fixture
        def executor_name(self):
            return "grpc"

        @pytest.fixture
        def executor_config(self, grpc_server):
            return {"target": grpc_server}

The tests are plain (synchronous) pytest tests that run their own event loop, so the
kit needs no asyncio plugin. Tasks come from :mod:`wove.testing.tasks`, importable
wherever wove-core is installed (without pytest).
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from ..environment import (
    EnvironmentExecutionError,
    EnvironmentExecutor,
    ExecutorRuntime,
    build_executor_from_name,
)
from ..errors import RemoteTraceback, StreamNotSupportedError
from ..protocol import TERMINAL_EVENTS
from . import tasks

__all__ = ["ExecutorContract", "WorkerProcess", "collect_events", "run_async", "tasks"]


class WorkerProcess:
    """``wove worker SERVICE`` in a subprocess on 127.0.0.1, for tests of worker services.

    :meth:`start` waits for the ``listening on <address>`` line; stderr is drained in the
    background (a chatty worker never blocks on a full pipe) and kept in
    :attr:`stderr_lines`. Restarting on the same port retries while the old socket lingers.

    Args:
        service: the ``wove worker`` subcommand (``http``, ``grpc``, ``websocket``, ...).
        args: further command-line arguments (``--security``, ``--path``...).
        env: environment variables added to this process's environment.
        startup_timeout: seconds to wait for the ready line.
    """

    def __init__(self, service: str, *args: str, env: dict[str, str] | None = None,
                 startup_timeout: float = 30.0) -> None:
        self.service = service
        self.args = args
        self.env = {**os.environ, **(env or {})}
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[str] | None = None
        self.address = ""
        self.port = 0
        self.stderr_lines: list[str] = []

    def command(self, port: int) -> list[str]:
        return [sys.executable, "-m", "wove.cli", "worker", self.service, "--port", str(port), *self.args]

    def start(self, port: int | None = None) -> str:
        """Start the worker (on ``port``; default: the previous port, or a free one).

        Returns:
            The address it printed (a URL, or ``host:port``).

        Raises:
            RuntimeError: no ready line within ``startup_timeout`` (with the worker's stderr).
        """
        port = self.port if port is None else port
        deadline = time.monotonic() + self.startup_timeout
        while True:
            proc = subprocess.Popen(self.command(port), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=self.env)
            lines: queue.Queue[str | None] = queue.Queue()
            stderr: list[str] = []
            threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
            threading.Thread(target=_collect, args=(proc.stderr, stderr), daemon=True).start()
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
            except queue.Empty:
                line = None
            if line is not None and "listening on " in line:
                break
            proc.kill()
            proc.wait(timeout=10)
            if time.monotonic() > deadline or port == 0:
                raise RuntimeError(
                    f"`{' '.join(self.command(port))}` did not start: first line {line!r}; "
                    f"stderr: {''.join(stderr)[-3000:]}"
                )
            time.sleep(0.1)  # the previous process's socket may linger briefly: retry
        self.proc, self.stderr_lines = proc, stderr
        self.address = line.split("listening on ", 1)[1].strip()
        self.port = int(self.address.rsplit(":", 1)[1].split("/", 1)[0])
        return self.address

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def kill(self) -> None:
        """SIGKILL (a crash, as far as clients can tell)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM (a graceful shutdown), then SIGKILL after ``grace`` seconds."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> WorkerProcess:
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _pump(stream: Any, lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _collect(stream: Any, into: list[str]) -> None:
    for line in stream:
        into.append(line)


def run_async(coro_factory: Callable[[], Awaitable[Any]], timeout: float = 60.0) -> Any:
    """Run ``coro_factory()`` on a fresh event loop, failing after ``timeout`` seconds."""

    async def bounded() -> Any:
        return await asyncio.wait_for(coro_factory(), timeout)

    return asyncio.run(bounded())


async def collect_events(
    executor: EnvironmentExecutor, run_ids: set[str], *, timeout: float = 30.0, linger: float = 0.3
) -> list[dict[str, Any]]:
    """Receive events until every run in ``run_ids`` has a terminal event, then ``linger``
    seconds more (so a duplicate terminal event would be caught)."""
    events: list[dict[str, Any]] = []
    finished: set[str] = set()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while finished != run_ids:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise AssertionError(f"no terminal event for {sorted(run_ids - finished)} within {timeout}s; got {events}")
        event = await asyncio.wait_for(executor.recv(), remaining)
        events.append(event)
        if event.get("type") in TERMINAL_EVENTS:
            finished.add(event["run_id"])
    try:
        while True:
            events.append(await asyncio.wait_for(executor.recv(), linger))
    except asyncio.TimeoutError:
        pass
    return events


def _run_frame(func: Any, args: dict[str, Any], **delivery: Any) -> dict[str, Any]:
    name = getattr(func, "__name__", "task")
    return {
        "type": "run_task",
        "run_id": f"{name}:{uuid.uuid4().hex}",
        "task_id": name,
        "callable": func,
        "args": args,
        "delivery": {"delivery_cancel_mode": "best_effort", "delivery_orphan_policy": "cancel", **delivery},
    }


class ExecutorContract:
    """The executor contract, proven the same way by every executor."""

    #: seconds any one contract test may take
    contract_timeout: float = 60.0

    @pytest.fixture
    def executor_name(self) -> str:
        pytest.fail("Define an `executor_name` fixture returning the executor's registered name.")

    @pytest.fixture
    def executor_config(self) -> dict[str, Any]:
        return {}

    @pytest.fixture
    def environment_definition(self, executor_name: str, executor_config: dict[str, Any]) -> dict[str, Any]:
        return {"executor": executor_name, "executor_config": executor_config}

    # -- helpers ---------------------------------------------------------------
    def _runtime(self, definition: dict[str, Any]) -> ExecutorRuntime:
        return ExecutorRuntime({"contract": definition}, {})

    async def _executor(self, definition: dict[str, Any]) -> EnvironmentExecutor:
        executor = build_executor_from_name(definition["executor"])
        await executor.start(
            environment_name="contract",
            environment_config=dict(definition.get("executor_config") or {}),
            run_config={},
        )
        return executor

    # -- the contract ----------------------------------------------------------
    def test_resolves_by_name(self, executor_name: str) -> None:
        executor = build_executor_from_name(executor_name)
        assert isinstance(executor, EnvironmentExecutor)
        assert build_executor_from_name(executor_name) is not executor, "factories must build fresh executors"

    def test_result_comes_back(self, environment_definition: dict[str, Any]) -> None:
        async def scenario() -> None:
            async with self._runtime(environment_definition) as runtime:
                assert await runtime.call("contract", tasks.add, 2, 3) == 5
                payload = {"nested": [1, 2.5, "x", None, {"k": b"bytes"}]}
                assert await runtime.call("contract", tasks.echo, payload) == payload

        run_async(scenario, self.contract_timeout)

    def test_task_exception_is_the_tasks_own(self, environment_definition: dict[str, Any]) -> None:
        async def scenario() -> None:
            async with self._runtime(environment_definition) as runtime:
                with pytest.raises(tasks.ContractTaskError, match="broken on purpose"):
                    await runtime.call("contract", tasks.fail, "broken on purpose")
                assert await runtime.call("contract", tasks.add, 1, 1) == 2  # still usable

        run_async(scenario, self.contract_timeout)

    def test_unencodable_result_fails_the_run_not_the_connection(
            self, environment_definition: dict[str, Any]) -> None:
        """A result the codec cannot encode ends its run with an error naming the task;
        the executor (and its connection) keeps serving later runs."""

        async def scenario() -> None:
            async with self._runtime(environment_definition) as runtime:
                try:
                    value = await runtime.call("contract", tasks.nested, 5000)
                except EnvironmentExecutionError as exc:
                    assert "nested" in str(exc), f"the error names the task: {exc}"
                else:  # in-process execution hands the object over without encoding it
                    assert len(value) == 1
                results = await asyncio.gather(*(runtime.call("contract", tasks.add, i, 1) for i in range(10)))
                assert results == [i + 1 for i in range(10)]

        run_async(scenario, self.contract_timeout)

    def test_one_terminal_event_per_run(self, environment_definition: dict[str, Any]) -> None:
        async def scenario() -> None:
            executor = await self._executor(environment_definition)
            try:
                frames = [_run_frame(tasks.add, {"a": i, "b": 1}) for i in range(20)]
                frames += [_run_frame(tasks.fail, {"message": f"e{i}"}) for i in range(5)]
                for frame in frames:
                    await executor.send(frame)
                events = await collect_events(executor, {f["run_id"] for f in frames})
                by_run = {f["run_id"]: f for f in frames}
                terminals = [e for e in events if e.get("type") in TERMINAL_EVENTS]
                assert sorted(e["run_id"] for e in terminals) == sorted(by_run), "exactly one terminal per run"
                for event in events:
                    if event.get("type") == "log":
                        continue
                    assert event["run_id"] in by_run
                    assert event["task_id"] == by_run[event["run_id"]]["task_id"]
                for event in terminals:
                    frame = by_run[event["run_id"]]
                    if frame["task_id"] == "add":
                        assert event["type"] == "task_result"
                        assert event["result"] == frame["args"]["a"] + 1
                    else:
                        assert event["type"] == "task_error"
                        error = event["error"]
                        assert set(error) >= {"kind", "message", "traceback", "retryable", "source"}
                        assert error["kind"] == "ContractTaskError"
                        assert error["source"] == "task"
                        assert frame["args"]["message"] in error["message"]
            finally:
                await executor.stop()

        run_async(scenario, self.contract_timeout)

    def test_cancel_is_honoured(self, environment_definition: dict[str, Any], tmp_path: Path) -> None:
        marker = tmp_path / "marker"

        async def scenario() -> None:
            executor = await self._executor(environment_definition)
            try:
                frame = _run_frame(tasks.sleep, {"seconds": 3.0, "marker": str(marker)})
                await executor.send(frame)
                await asyncio.sleep(0.3)
                await executor.send({
                    "type": "cancel_task", "run_id": frame["run_id"], "task_id": frame["task_id"],
                    "delivery_cancel_mode": "require_ack", "delivery_orphan_policy": "cancel",
                })
                events = await collect_events(executor, {frame["run_id"]}, timeout=10.0)
                terminal = [e for e in events if e.get("type") in TERMINAL_EVENTS]
                assert [e["type"] for e in terminal] == ["task_cancelled"]
                await asyncio.sleep(3.2)
                assert not marker.exists(), "a cancelled run must not complete its side effect"
            finally:
                await executor.stop()

        run_async(scenario, self.contract_timeout)

    def test_runtime_cancellation_raises_cancelled(self, environment_definition: dict[str, Any]) -> None:
        async def scenario() -> None:
            async with self._runtime(environment_definition) as runtime:
                call = asyncio.ensure_future(runtime.call("contract", tasks.sleep, 5.0))
                await asyncio.sleep(0.3)
                call.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await call
                assert await runtime.call("contract", tasks.add, 1, 2) == 3

        run_async(scenario, self.contract_timeout)

    def test_unknown_command_is_rejected(self, environment_definition: dict[str, Any]) -> None:
        async def scenario() -> None:
            executor = await self._executor(environment_definition)
            try:
                with pytest.raises((ValueError, TypeError)):
                    await executor.send({"type": "launch_missiles", "run_id": "x:1", "task_id": "x"})
                frame = _run_frame(tasks.add, {"a": 1, "b": 2})
                await executor.send(frame)
                events = await collect_events(executor, {frame["run_id"]})
                assert [e["result"] for e in events if e.get("type") == "task_result"] == [3]
            finally:
                await executor.stop()

        run_async(scenario, self.contract_timeout)

    def test_heartbeats_keep_a_long_task_alive(self, environment_definition: dict[str, Any]) -> None:
        async def scenario() -> None:
            async with self._runtime(environment_definition) as runtime:
                # a 1 s window, heartbeats every third of it, a task twice as long as the window
                result = await runtime.call_with(
                    "contract", tasks.sleep, (2.0,), delivery_heartbeat_seconds=1.0
                )
                assert result == "slept"

        run_async(scenario, self.contract_timeout)

    def test_delivery_timeout(self, environment_definition: dict[str, Any]) -> None:
        from ..errors import DeliveryTimeoutError

        async def scenario() -> None:
            async with self._runtime(environment_definition) as runtime:
                with pytest.raises(DeliveryTimeoutError, match="delivery_timeout"):
                    await runtime.call_with("contract", tasks.sleep, (5.0,), delivery_timeout=0.5)
                assert await runtime.call("contract", tasks.add, 2, 2) == 4

        run_async(scenario, self.contract_timeout)

    def test_many_concurrent_runs(self, environment_definition: dict[str, Any]) -> None:
        async def scenario() -> None:
            async with self._runtime(environment_definition) as runtime:
                results = await asyncio.gather(*(runtime.call("contract", tasks.add, i, i) for i in range(200)))
                assert results == [2 * i for i in range(200)]

        run_async(scenario, self.contract_timeout)

    # -- remote tracebacks and output --------------------------------------------
    def test_task_exception_carries_the_worker_traceback(self, environment_definition: dict[str, Any]) -> None:
        """The task's ValueError comes back as ValueError; across a process boundary its
        ``__cause__`` is the worker's traceback (naming the helper and its failing line) and
        a note says where it was raised. In process it is the very exception, with its own
        traceback."""

        async def scenario() -> tuple[BaseException, bool]:
            async with self._runtime(environment_definition) as runtime:
                try:
                    await runtime.call("contract", tasks.fail_in_helper, "helper broke")
                except ValueError as exc:
                    return exc, runtime.is_local_environment("contract")
                raise AssertionError("fail_in_helper returned instead of raising ValueError")

        error, local = run_async(scenario, self.contract_timeout)
        assert str(error) == "helper broke"
        frames = {frame.name for frame in traceback.extract_tb(error.__traceback__)}
        if local or "failing_helper" in frames:
            # the exception object itself (in process, or an engine's in-process workers):
            # its own traceback holds the task's frames
            text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        else:
            cause = error.__cause__
            assert isinstance(cause, RemoteTraceback), f"__cause__ is {cause!r}, not the worker's traceback"
            text = str(cause)
            notes = getattr(error, "__notes__", [])
            assert any("environment 'contract'" in note and "pid" in note and "host" in note for note in notes), notes
        assert "failing_helper" in text and "raise ValueError(message)  # failing_helper" in text, text
        assert "fail_in_helper" in text, text

    def test_exception_that_cannot_be_rebuilt_names_its_type(self, environment_definition: dict[str, Any]) -> None:
        """An exception that does not unpickle on the caller is EnvironmentExecutionError
        naming the remote type and message and carrying the worker's traceback."""

        async def scenario() -> tuple[BaseException, bool]:
            async with self._runtime(environment_definition) as runtime:
                try:
                    await runtime.call("contract", tasks.raise_unrebuildable, "this", "that")
                except Exception as exc:
                    return exc, runtime.is_local_environment("contract")
                raise AssertionError("raise_unrebuildable returned instead of raising")

        error, local = run_async(scenario, self.contract_timeout)
        frames = {frame.name for frame in traceback.extract_tb(error.__traceback__)}
        if local or "raise_unrebuildable" in frames:
            # nothing was pickled (in process, or an engine's in-process workers): the object itself
            assert isinstance(error, tasks.UnrebuildableError), f"{type(error).__name__}: {error}"
            return
        assert isinstance(error, EnvironmentExecutionError), f"{type(error).__name__}: {error}"
        assert "UnrebuildableError" in str(error) and "this and that" in str(error), str(error)
        assert "raise_unrebuildable" in error.traceback, error.traceback
        assert isinstance(error.__cause__, RemoteTraceback)

    def test_task_output_reaches_the_caller_tagged(self, environment_definition: dict[str, Any],
                                                   capsys: pytest.CaptureFixture[str],
                                                   caplog: pytest.LogCaptureFixture) -> None:
        """print() (stdout and stderr) and logging in a task, async and sync, reach the
        caller: lines on its stderr and records on its logger of the same name, tagged
        ``(<task> env=<environment> pid=<pid>)``. In process (local) the output already is
        the caller's: printed where the task prints it, not tagged."""
        caplog.set_level(logging.INFO, logger=tasks.OUTPUT_LOGGER)

        async def scenario() -> bool:
            async with self._runtime(environment_definition) as runtime:
                assert await runtime.call("contract", tasks.chatty, "alpha", 2) == "alpha"
                assert await runtime.call("contract", tasks.chatty_sync, "beta", 2) == "beta"
                return runtime.is_local_environment("contract")

        local = run_async(scenario, self.contract_timeout)
        captured = capsys.readouterr()
        messages = [record.getMessage() for record in caplog.records if record.name == tasks.OUTPUT_LOGGER]
        if local:
            for index in range(2):
                assert f"alpha line {index}" in captured.out and f"beta line {index}" in captured.out
                assert f"beta err {index}" in captured.err
                assert f"alpha record {index}" in messages and f"beta record {index}" in messages
            return
        lines = captured.err.splitlines()
        for task, tag, kinds in (("chatty", "alpha", ("line",)), ("chatty_sync", "beta", ("line", "err"))):
            for kind in kinds:
                for index in range(2):
                    pattern = rf"\({task} env=contract pid=\d+( host=\S+)?\) {tag} {kind} {index}"
                    assert any(re.fullmatch(pattern, line) for line in lines), (pattern, captured.err)
                    assert f"{tag} {kind} {index}" not in captured.out, "a remote task's print is not the caller's stdout"
            for index in range(2):
                pattern = rf"\({task} env=contract pid=\d+( host=\S+)?\) {tag} record {index}"
                assert any(re.fullmatch(pattern, message) for message in messages), (pattern, messages)
        tagged = [r for r in caplog.records if r.name == tasks.OUTPUT_LOGGER and hasattr(r, "wove_run_id")]
        assert {getattr(r, "wove_environment", None) for r in tagged} == {"contract"}
        assert {getattr(r, "wove_task", None) for r in tagged} == {"chatty", "chatty_sync"}
        assert all(r.levelno == logging.WARNING for r in tagged)

    def test_concurrent_runs_output_is_not_mixed(self, environment_definition: dict[str, Any],
                                                 capsys: pytest.CaptureFixture[str],
                                                 caplog: pytest.LogCaptureFixture) -> None:
        """Runs printing and logging at the same time on one worker (async on its loop,
        sync on its threads) each get their own lines and records, whole and in order."""
        caplog.set_level(logging.INFO, logger=tasks.OUTPUT_LOGGER)
        names = {"left": tasks.chatty, "right": tasks.chatty, "up": tasks.chatty_sync, "down": tasks.chatty_sync}
        lines_each = 6

        async def scenario() -> bool:
            async with self._runtime(environment_definition) as runtime:
                results = await asyncio.gather(*(
                    runtime.call_with("contract", func, (name, lines_each, 0.02), task_name=name)
                    for name, func in names.items()))
                assert results == list(names)
                return runtime.is_local_environment("contract")

        local = run_async(scenario, self.contract_timeout)
        captured = capsys.readouterr()
        if local:
            for name in names:
                assert all(f"{name} line {i}" in captured.out for i in range(lines_each)), captured.out
            return
        tag = re.compile(r"\((\w+) env=contract pid=\d+(?: host=\S+)?\) (.*)")
        seen: dict[str, list[str]] = {name: [] for name in names}
        for line in captured.err.splitlines():
            match = tag.fullmatch(line)
            if match is None or match.group(1) not in names:
                continue
            seen[match.group(1)].append(match.group(2))
        for name in names:
            printed = [text for text in seen[name] if " line " in text]
            assert printed == [f"{name} line {i}" for i in range(lines_each)], (name, seen[name])
            assert all(text.startswith(f"{name} ") for text in seen[name]), (name, seen[name])
        by_run: dict[str, set[str]] = {}
        for record in caplog.records:
            run_id = getattr(record, "wove_run_id", None)
            if record.name == tasks.OUTPUT_LOGGER and run_id is not None:
                by_run.setdefault(run_id, set()).add(record.getMessage())
        assert len(by_run) == len(names), by_run
        for run_id, messages in by_run.items():
            name = run_id.split(":", 1)[0]
            bodies = {match.group(2) if match else message
                      for message, match in ((message, tag.fullmatch(message)) for message in messages)}
            assert bodies == {f"{name} record {i}" for i in range(lines_each)}, (run_id, messages)

    def test_capture_output_false_leaves_output_on_the_worker(self, environment_definition: dict[str, Any],
                                                              capsys: pytest.CaptureFixture[str],
                                                              caplog: pytest.LogCaptureFixture) -> None:
        """``capture_output: false`` in the definition: nothing of the task's output is
        sent to the caller (it stays in the worker's own streams and logging)."""
        caplog.set_level(logging.INFO, logger=tasks.OUTPUT_LOGGER)
        definition = {**environment_definition, "capture_output": False}

        async def scenario() -> None:
            async with self._runtime(definition) as runtime:
                assert await runtime.call("contract", tasks.chatty, "quiet", 2) == "quiet"
                assert await runtime.call("contract", tasks.chatty_sync, "hushed", 2) == "hushed"

        run_async(scenario, self.contract_timeout)
        captured = capsys.readouterr()
        assert "env=contract" not in captured.err, captured.err
        assert not [r for r in caplog.records if hasattr(r, "wove_run_id")], "no record was forwarded"

    # -- the calling API (futures, map) ----------------------------------------------
    def test_futures_gather_and_as_completed(self, environment_definition: dict[str, Any]) -> None:
        from ..futures import RunFuture, as_completed, gather

        async def scenario() -> None:
            async with self._runtime(environment_definition) as runtime:
                future = runtime.submit("contract", tasks.add, 2, 3)
                assert isinstance(future, RunFuture) and future.environment == "contract"
                assert future.run_id.startswith("add:")
                assert await future == 5 and future.done() and future.result() == 5
                failing = runtime.submit("contract", tasks.fail, "future failed")
                with pytest.raises(tasks.ContractTaskError, match="future failed"):
                    await failing
                assert isinstance(failing.exception(), tasks.ContractTaskError)
                futures = [runtime.submit("contract", tasks.add, i, 1) for i in range(10)]
                assert await gather(*futures) == [i + 1 for i in range(10)]
                done = [f.result() async for f in as_completed([runtime.submit("contract", tasks.echo, i)
                                                                 for i in range(10)])]
                assert sorted(done) == list(range(10))

        run_async(scenario, self.contract_timeout)

    def test_future_cancel_cancels_the_run(self, environment_definition: dict[str, Any]) -> None:
        async def scenario() -> None:
            async with self._runtime(environment_definition) as runtime:
                future = runtime.submit("contract", tasks.sleep, 30.0)
                await asyncio.sleep(0.3)
                assert future.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await future
                assert future.cancelled()
                assert await runtime.call("contract", tasks.add, 1, 2) == 3

        run_async(scenario, self.contract_timeout)

    def test_map_ordered_unordered_and_return_exceptions(self, environment_definition: dict[str, Any]) -> None:
        async def scenario() -> None:
            async with self._runtime(environment_definition) as runtime:
                ordered = [x async for x in runtime.map("contract", tasks.add, range(40), range(40), buffersize=8)]
                assert ordered == [2 * i for i in range(40)]
                unordered = [x async for x in runtime.map("contract", tasks.echo, range(40), ordered=False)]
                assert sorted(unordered) == list(range(40))
                mixed = [x async for x in runtime.starmap(
                    "contract", tasks.fail, [("m0",), ("m1",)], return_exceptions=True)]
                assert [str(e) for e in mixed] == ["m0", "m1"]
                assert all(isinstance(e, tasks.ContractTaskError) for e in mixed)
                async for _ in runtime.map("contract", tasks.sleep, [0.0, 30.0, 30.0]):
                    break  # leaving early cancels the two long runs; the runtime stays usable
                assert await runtime.call("contract", tasks.add, 2, 2) == 4

        run_async(scenario, self.contract_timeout)

    # -- streamed results (runtime.stream) -------------------------------------------------
    #: True: the executor must stream generator results; False: it must refuse with
    #: StreamNotSupportedError; None: either, by its announced capabilities.
    expect_streaming: bool | None = None

    async def _stream(self, runtime: ExecutorRuntime, func: Any, *args: Any, **kwargs: Any) -> Any:
        """``runtime.stream(...)``, started, or None after asserting the clear error of an
        executor whose worker did not announce streamed results (before anything was sent)."""
        try:
            stream = runtime.stream("contract", func, *args, **kwargs)
            await stream.start()
        except StreamNotSupportedError as exc:
            assert self.expect_streaming is not True, f"this executor should stream results: {exc}"
            assert "does not support streamed results" in str(exc) and "upgrade" in str(exc), exc
            assert "task_yield" in str(exc), exc
            assert await runtime.call("contract", tasks.add, 1, 2) == 3  # plain calls still work
            return None
        assert self.expect_streaming is not False, "this executor's worker should not be sent a streamed run"
        return stream

    def test_stream_items_arrive_before_the_generator_finishes(self, environment_definition: dict[str, Any],
                                                               tmp_path: Path) -> None:
        release = tmp_path / "release"

        async def scenario() -> None:
            async with self._runtime(environment_definition) as runtime:
                stream = await self._stream(runtime, tasks.stream_until_released, str(release))
                if stream is None:
                    return
                items = stream.__aiter__()
                # the generator is still waiting for `release`: the first item came as produced
                assert await asyncio.wait_for(items.__anext__(), 30.0) == "first"
                release.write_text("go")
                assert await asyncio.wait_for(items.__anext__(), 30.0) == "second"
                with pytest.raises(StopAsyncIteration):
                    await items.__anext__()
                assert await runtime.call("contract", tasks.add, 1, 1) == 2

        run_async(scenario, self.contract_timeout)

    @pytest.mark.parametrize("generator", ["sync", "async"])
    def test_stream_window_bounds_how_far_the_worker_runs_ahead(
            self, environment_definition: dict[str, Any], tmp_path: Path, generator: str) -> None:
        window = 4
        counter = tmp_path / "produced"
        func = tasks.count_up if generator == "sync" else tasks.acount_up

        def produced() -> int:
            text = counter.read_text() if counter.exists() else ""
            return int(text) if text else 0

        async def scenario() -> None:
            definition = {**environment_definition, "delivery_stream_window": window}
            async with ExecutorRuntime({"contract": definition}, {}) as runtime:
                stream = await self._stream(runtime, func, 30, str(counter))
                if stream is None:
                    return
                items = stream.__aiter__()
                assert await items.__anext__() == 0
                for _ in range(500):  # the worker fills the window, then waits for credit
                    if produced() >= window:
                        break
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.3)
                assert produced() <= 1 + window, f"produced {produced()} items with 1 consumed, window {window}"
                consumed = 1
                async for item in items:
                    assert item == consumed
                    consumed += 1
                    assert produced() <= consumed + window
                assert consumed == 30

        run_async(scenario, self.contract_timeout)

    def test_stream_break_closes_the_remote_generator(self, environment_definition: dict[str, Any],
                                                      tmp_path: Path) -> None:
        marker = tmp_path / "closed"

        async def scenario() -> None:
            async with self._runtime(environment_definition) as runtime:
                stream = await self._stream(runtime, tasks.count_up, 100_000, str(tmp_path / "n"), str(marker))
                if stream is None:
                    return
                seen = []
                async for item in stream:
                    seen.append(item)
                    if len(seen) == 2:
                        break
                del stream
                for _ in range(1000):  # the cancel_task reaches the worker, which closes the generator
                    if marker.exists():
                        break
                    await asyncio.sleep(0.01)
                assert marker.exists(), "the generator's finally did not run after the consumer left"
                assert seen == [0, 1]
                assert await runtime.call("contract", tasks.add, 2, 2) == 4

        run_async(scenario, self.contract_timeout)

    def test_stream_error_arrives_after_the_items_before_it(self, environment_definition: dict[str, Any]) -> None:
        async def scenario() -> None:
            async with self._runtime(environment_definition) as runtime:
                stream = await self._stream(runtime, tasks.yield_then_fail, 2, "broke after two")
                if stream is None:
                    return
                seen: list[Any] = []
                with pytest.raises(tasks.ContractTaskError, match="broke after two"):
                    async for item in stream:
                        seen.append(item)
                assert seen == [0, 1]

        run_async(scenario, self.contract_timeout)
