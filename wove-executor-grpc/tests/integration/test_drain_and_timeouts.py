"""The gRPC worker service's drain (SIGTERM with runs in flight) and its connection timeouts."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest

from wove.environment import ExecutorRuntime
from wove.protocol import TERMINAL_EVENTS, decode_events, encode_frame
from wove_executor_grpc import GrpcEnvironmentExecutor
from wove_executor_grpc.server import SESSION_CONFIRMATION, SESSION_METHOD, start_server

pytestmark = pytest.mark.integration


def sleep_frame(seconds: float, result: Any, policy: str = "detach") -> dict[str, Any]:
    """A run of ``asyncio.sleep(seconds, result=result)`` (importable in any worker)."""
    return {
        "type": "run_task", "run_id": f"sleep:{uuid.uuid4().hex}", "task_id": "sleep",
        "callable": asyncio.sleep, "args": {"delay": seconds, "result": result},
        "delivery": {"delivery_cancel_mode": "best_effort", "delivery_orphan_policy": policy},
    }


async def receive_until(executor: GrpcEnvironmentExecutor, events: list[dict[str, Any]],
                        done: Any, timeout: float = 30.0) -> None:
    """Receive events into ``events`` until ``done(events)`` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not done(events):
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise AssertionError(f"gave up waiting after {timeout}s; got {len(events)} events: {events[-5:]}")
        events.append(await asyncio.wait_for(executor.recv(), remaining))


def terminals(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {e["run_id"]: e for e in events if e.get("type") in TERMINAL_EVENTS}


def started(events: list[dict[str, Any]]) -> set[str]:
    return {e["run_id"] for e in events if e.get("type") == "task_started"}


@pytest.fixture
async def executor_for() -> AsyncIterator[Any]:
    started_executors: list[GrpcEnvironmentExecutor] = []

    async def start(target: str, **config: Any) -> GrpcEnvironmentExecutor:
        executor = GrpcEnvironmentExecutor()
        await executor.start(environment_name="drain", environment_config={"target": target, **config},
                             run_config={})
        started_executors.append(executor)
        return executor

    yield start
    for executor in started_executors:
        await executor.stop()


def wait_exit(proc: subprocess.Popen[str]) -> int:
    return proc.wait(timeout=30)


# -- drain ------------------------------------------------------------------------------
async def test_sigterm_delivers_every_finished_detach_run(worker_factory: Any, executor_for: Any) -> None:
    worker = worker_factory()
    executor = await executor_for(worker.target)  # streaming "auto": one Session call for all runs
    # 200 runs of 0.5 s (under the worker's 256 concurrent runs) end together, in the drain:
    # their events keep coming while the session writes a batch
    frames = [sleep_frame(0.5, i) for i in range(200)]
    for frame in frames:
        await executor.send(frame)
    events: list[dict[str, Any]] = []
    await receive_until(executor, events, lambda got: len(started(got)) == len(frames))

    assert worker.proc is not None
    worker.proc.send_signal(signal.SIGTERM)  # a graceful drain while all the runs are in flight
    await receive_until(executor, events, lambda got: len(terminals(got)) == len(frames))

    outcome = terminals(events)
    wrong = [event for event in outcome.values() if event["type"] != "task_result"]
    assert not wrong, f"{len(wrong)} of {len(frames)} detach runs did not return their result: {wrong[:2]}"
    assert [outcome[f["run_id"]]["result"] for f in frames] == [f["args"]["result"] for f in frames]
    assert await asyncio.to_thread(wait_exit, worker.proc) == 0


async def test_sigterm_drain_waits_for_a_slow_reader(worker_factory: Any) -> None:
    # A client that reads slowly: the session's first result write blocks (HTTP/2 flow
    # control) while the other runs finish and the engine shuts down. Every result still
    # arrives, then the call ends with OK.
    worker = worker_factory()
    frames = [sleep_frame(0.2 + i * 0.02, f"{i}:" + "r" * 1_000_000) for i in range(20)]
    events: list[dict[str, Any]] = []
    options = [("grpc.max_receive_message_length", 256 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(worker.target, options=options) as channel:
        call = channel.stream_stream(SESSION_METHOD)(timeout=30)
        await call.write(b"[" + b",".join(encode_frame(frame) for frame in frames) + b"]")
        while len(started(events)) < len(frames):
            events.extend(decode_events(await call.read()))
        assert worker.proc is not None
        worker.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(1.5)  # read nothing while the runs end and the worker drains
        try:
            while (message := await call.read()) is not grpc.aio.EOF:
                events.extend(decode_events(message))
        except grpc.aio.AioRpcError:
            pass  # the status is checked below, after the missing results
        status = await call.code()
    outcome = terminals(events)
    results = [outcome[f["run_id"]].get("result") if f["run_id"] in outcome else None for f in frames]
    missing = [f["run_id"] for f, result in zip(frames, results) if result != f["args"]["result"]]
    assert not missing, f"{len(missing)} of {len(frames)} results did not arrive (call ended with {status})"
    assert status == grpc.StatusCode.OK
    assert await asyncio.to_thread(wait_exit, worker.proc) == 0


async def test_sigterm_cancels_runs_that_outlive_the_grace_with_a_terminal_event(
    worker_factory: Any, executor_for: Any
) -> None:
    worker = worker_factory("--grace", "0.5")
    executor = await executor_for(worker.target)
    quick = [sleep_frame(0.1, f"quick-{i}") for i in range(10)]
    slow = [sleep_frame(30.0, f"slow-{i}") for i in range(5)]
    for frame in quick + slow:
        await executor.send(frame)
    events: list[dict[str, Any]] = []
    await receive_until(executor, events, lambda got: len(started(got)) == 15)

    assert worker.proc is not None
    worker.proc.send_signal(signal.SIGTERM)
    await receive_until(executor, events, lambda got: len(terminals(got)) == 15)

    outcome = terminals(events)
    for frame in quick:
        event = outcome[frame["run_id"]]
        assert event["type"] == "task_result" and event["result"] == frame["args"]["result"], event
    for frame in slow:  # past the grace: cancelled by the worker, and told so
        assert outcome[frame["run_id"]]["type"] == "task_cancelled", outcome[frame["run_id"]]
    assert await asyncio.to_thread(wait_exit, worker.proc) == 0


async def test_drain_delivers_detach_results_and_requeues_requeue_runs(worker_factory: Any) -> None:
    worker = worker_factory()
    config = {"target": worker.target, "ready_timeout": 20}
    async with ExecutorRuntime({"w": {"executor": "grpc", "executor_config": config}}, {}) as runtime:
        detach = [asyncio.ensure_future(runtime.call_with(
            "w", asyncio.sleep, (0.5,), {"result": i}, delivery_orphan_policy="detach")) for i in range(20)]
        requeue = [asyncio.ensure_future(runtime.call_with(
            "w", asyncio.sleep, (0.5,), {"result": 100 + i}, delivery_orphan_policy="requeue")) for i in range(5)]
        # every run reached the worker: a canary sent after them comes back first
        assert await runtime.call("w", asyncio.sleep, 0, "canary") == "canary"
        assert worker.proc is not None
        worker.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(wait_exit, worker.proc) == 0
        worker_factory(port=worker.port)  # requeue runs go to the worker that comes back
        results = await asyncio.wait_for(asyncio.gather(*detach, *requeue, return_exceptions=True), 40)
    assert results == [*range(20), *range(100, 105)]


async def test_session_confirms_the_method_before_reading_commands() -> None:
    running = await start_server()
    try:
        async with grpc.aio.insecure_channel(running.target) as channel:
            call = channel.stream_stream(SESSION_METHOD)(timeout=10)
            metadata = await asyncio.wait_for(call.initial_metadata(), 10)  # nothing written yet
            assert dict(SESSION_CONFIRMATION).items() <= dict(metadata).items()
            await call.done_writing()
            assert [message async for message in call] == []
            assert await call.code() == grpc.StatusCode.OK
    finally:
        await running.stop(1.0)


# -- connection timeouts -----------------------------------------------------------------
async def closed_by_server(port: int, first_bytes: bytes = b"", within: float = 15.0) -> bool:
    """Open a raw TCP connection, send ``first_bytes``, then nothing: True once the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if first_bytes:
            writer.write(first_bytes)
            await writer.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while loop.time() < deadline:
            try:
                data = await asyncio.wait_for(reader.read(65536), deadline - loop.time())
            except asyncio.TimeoutError:
                return False
            except ConnectionError:
                return True
            if not data:
                return True
        return False
    finally:
        writer.close()


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")  # + empty SETTINGS


async def test_a_connection_that_sends_nothing_is_closed() -> None:
    running = await start_server(handshake_timeout=0.5, idle_timeout=0.5)
    try:
        assert await closed_by_server(running.port), "a silent TCP connection stayed open"
        # past the handshake (HTTP/2 preface and SETTINGS), then idle: closed by idle_timeout
        assert await closed_by_server(running.port, HTTP2_PREFACE), "an idle HTTP/2 connection stayed open"
    finally:
        await running.stop(1.0)


async def test_a_silent_connection_stays_open_without_timeouts() -> None:
    # the same probe against a server with both timeouts off: proves the probe can fail
    running = await start_server(handshake_timeout=None, idle_timeout=None)
    try:
        assert not await closed_by_server(running.port, within=1.5)
    finally:
        await running.stop(1.0)


async def test_clients_reconnect_after_an_idle_close() -> None:
    running = await start_server(idle_timeout=0.3)
    try:
        config = {"target": running.target, "streaming": False}  # Send: no call stays open
        async with ExecutorRuntime({"w": {"executor": "grpc", "executor_config": config}}, {}) as runtime:
            assert await runtime.call("w", asyncio.sleep, 0, 1) == 1
            await asyncio.sleep(1.0)  # the idle connection is closed meanwhile
            assert await runtime.call("w", asyncio.sleep, 0, 2) == 2
    finally:
        await running.stop(1.0)


@pytest.mark.parametrize(("name", "value"), [("idle_timeout", 0), ("handshake_timeout", -1.0),
                                             ("keepalive_interval", "60"), ("max_connection_age", float("nan"))])
async def test_bad_timeouts_are_refused(name: str, value: Any) -> None:
    with pytest.raises(ValueError, match=name) as info:
        await start_server(**{name: value})
    assert repr(value) in str(info.value)


async def test_wove_worker_grpc_takes_the_timeouts_as_flags(worker_factory: Any) -> None:
    quick = worker_factory("--handshake-timeout", "0.5", "--idle-timeout", "0.5")
    port = int(quick.target.rsplit(":", 1)[1])
    assert await closed_by_server(port), "--handshake-timeout 0.5: a silent TCP connection stayed open"
    assert await closed_by_server(port, HTTP2_PREFACE), "--idle-timeout 0.5: an idle connection stayed open"
    never = worker_factory("--handshake-timeout", "off", "--idle-timeout", "off")
    assert not await closed_by_server(int(never.target.rsplit(":", 1)[1]), within=1.5)


def test_a_bad_timeout_flag_is_one_line_naming_it() -> None:
    result = subprocess.run([sys.executable, "-m", "wove.cli", "worker", "grpc", "--idle-timeout", "0"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "--idle-timeout" in result.stderr and "'0'" in result.stderr and "off" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
