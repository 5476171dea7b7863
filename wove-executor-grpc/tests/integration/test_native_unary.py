"""``executor_config.unary_client``: the native HTTP/2 client of the Send calls and grpcio.

Real servers on 127.0.0.1 (the project's worker service, ``streaming: false``); every case runs
with both clients and must read the same: results, the worker's errors, limits, deadlines,
signed metadata, GOAWAY when the server stops; and the edges: a worker killed with calls in
flight (re-delivery per orphan policy), 100 MiB both ways, GOAWAY and restarts between calls,
calls the server did not process, more calls than MAX_CONCURRENT_STREAMS (SETTINGS on time or
late), a server that never sends SETTINGS, a deadline on a shared connection, flow control.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from wove.environment import ExecutorRuntime
from wove.errors import ConfigError, EnvironmentExecutionError
from wove_executor_grpc.server import GrpcWorkerServer, start_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

CLIENTS = ["native", "grpcio"]
SECRET = "native-unary-secret"


def echo(value: Any) -> Any:
    return value


def fail(text: str) -> None:
    raise ValueError(text)


async def hold(release: str, value: Any) -> Any:
    """Wait until the file ``release`` exists (at most 60 s), then return ``value``."""
    for _ in range(6000):
        if os.path.exists(release):
            break
        await asyncio.sleep(0.01)
    return value


def snooze(seconds: float) -> str:
    import time

    time.sleep(seconds)
    return "woke"


@pytest.fixture
async def server() -> AsyncIterator[GrpcWorkerServer]:
    running = await start_server()
    yield running
    await running.stop(0.5)


def runtime(target: str, client: str, **config: Any) -> ExecutorRuntime:
    executor_config = {"target": target, "streaming": False, "unary_client": client, **config}
    return ExecutorRuntime({"w": {"executor": "grpc", "executor_config": executor_config}}, {})


@pytest.mark.parametrize("client", CLIENTS)
async def test_results_and_many_in_flight(server: GrpcWorkerServer, client: str) -> None:
    async with runtime(server.target, client) as rt:
        results = await asyncio.wait_for(asyncio.gather(*(rt.call_with("w", echo, (i,)) for i in range(300))), 30)
    assert results == list(range(300))


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_large_argument_and_result(server: GrpcWorkerServer, client: str) -> None:
    big = b"x" * (40 * 1024 * 1024)  # far over every HTTP/2 window: flow control both ways
    async with runtime(server.target, client) as rt:
        assert await asyncio.wait_for(rt.call_with("w", echo, (big,)), 50) == big


@pytest.mark.parametrize("client", CLIENTS)
async def test_the_workers_error(server: GrpcWorkerServer, client: str) -> None:
    async with runtime(server.target, client) as rt:
        with pytest.raises(Exception, match="boom"):
            await asyncio.wait_for(rt.call_with("w", fail, ("boom",)), 20)


@pytest.mark.parametrize("client", CLIENTS)
async def test_unimplemented_method(server: GrpcWorkerServer, client: str) -> None:
    async with runtime(server.target, client, method="/no.Such/Method") as rt:
        with pytest.raises(EnvironmentExecutionError, match="UNIMPLEMENTED") as info:
            await asyncio.wait_for(rt.call_with("w", echo, (1,)), 20)
    assert "executor_config.method" in str(info.value)


@pytest.mark.parametrize("client", CLIENTS)
async def test_deadline(server: GrpcWorkerServer, client: str) -> None:
    async with runtime(server.target, client, timeout=0.5, max_deliveries=1) as rt:
        with pytest.raises(EnvironmentExecutionError, match="DEADLINE_EXCEEDED"):
            await asyncio.wait_for(rt.call_with("w", snooze, (5,)), 20)


@pytest.mark.parametrize("client", CLIENTS)
async def test_the_message_limit(server: GrpcWorkerServer, client: str) -> None:
    async with runtime(server.target, client, max_message_bytes=100_000) as rt:
        with pytest.raises(Exception, match="max_message_bytes"):
            await asyncio.wait_for(rt.call_with("w", echo, (b"y" * 200_000,)), 20)


@pytest.mark.parametrize("client", CLIENTS)
async def test_signed_metadata(client: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WOVE_NATIVE_TEST_SECRET", SECRET)
    running = await start_server(security={"type": "signed", "secret": SECRET})
    try:
        async with runtime(running.target, client, security="env:WOVE_NATIVE_TEST_SECRET") as rt:
            assert await asyncio.wait_for(rt.call_with("w", echo, ("signed",)), 20) == "signed"
        async with runtime(running.target, client, max_deliveries=1) as rt:
            with pytest.raises(EnvironmentExecutionError, match=r"UNAUTHENTICATED|PERMISSION_DENIED"):
                await asyncio.wait_for(rt.call_with("w", echo, ("unsigned",)), 20)
    finally:
        await running.stop(0.5)


@pytest.mark.parametrize("client", CLIENTS)
async def test_connection_refused(client: str) -> None:
    running = await start_server()
    target = running.target
    await running.stop(0)
    async with runtime(target, client, max_deliveries=1, reconnect_timeout=0.5) as rt:
        with pytest.raises(EnvironmentExecutionError, match="Is the worker service running"):
            await asyncio.wait_for(rt.call_with("w", echo, (1,)), 20)


@pytest.mark.parametrize("client", CLIENTS)
async def test_the_server_stops_between_calls(client: str) -> None:
    """The server stops (GOAWAY on the idle connection): the next run fails as a transport error."""
    running = await start_server()
    async with runtime(running.target, client, max_deliveries=1, reconnect_timeout=0.5) as rt:
        assert await asyncio.wait_for(rt.call_with("w", echo, (1,)), 20) == 1
        await running.stop(0)
        with pytest.raises(EnvironmentExecutionError) as info:
            await asyncio.wait_for(rt.call_with("w", echo, (2,)), 20)
    assert info.value.payload["source"] == "transport"


async def test_native_refuses_what_it_cannot_serve() -> None:
    config = {"target": "127.0.0.1:1", "streaming": False, "unary_client": "native",
              "options": {"grpc.keepalive_time_ms": 10000}}
    with pytest.raises(ConfigError, match="unary_client"):
        async with ExecutorRuntime({"w": {"executor": "grpc", "executor_config": config}}, {}) as rt:
            await rt.call_with("w", echo, (1,))


# -- edge cases: a killed worker, large messages, GOAWAY, stream limits, deadlines, windows ------
MiB = 1024 * 1024


def h2_frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + struct.pack(">I", stream_id) + payload


class Proxy:
    """A TCP proxy on 127.0.0.1 in front of ``port``: counts the connections it accepted, and
    holds back the server's first bytes (its SETTINGS) for ``delay`` seconds when asked to.

    The connections numbered in ``refuse`` (from 1) do not reach the server: they speak just
    enough HTTP/2 to answer the first request with GOAWAY naming no stream as processed (last
    stream id 0), then close, as a server going away that took none of the calls. With
    ``goaway_after`` N, a connection that reaches the server passes its first N calls and
    answers the next one with GOAWAY naming the last passed stream: a server going away on an
    open connection, leaving that call unprocessed (it never reaches the server)."""

    def __init__(self, port: int, *, delay: float = 0.0, refuse: range = range(0),
                 goaway_after: int | None = None) -> None:
        self.port, self.delay, self.refuse, self.goaway_after = port, delay, refuse, goaway_after
        self.connections = 0
        self.target = ""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._accepted, "127.0.0.1", 0)
        self.target = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.ensure_future(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections in self.refuse:
            await self._go_away(reader, writer)
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            writer.close()
            return
        if self.goaway_after is None:
            pipes = [asyncio.ensure_future(self._pipe(reader, upstream_writer, 0.0)),
                     asyncio.ensure_future(self._pipe(upstream_reader, writer, self.delay))]
        else:
            lock = asyncio.Lock()  # whole frames only, on the way to the client
            pipes = [asyncio.ensure_future(self._calls(reader, upstream_writer, writer, lock, self.goaway_after)),
                     asyncio.ensure_future(self._frames(upstream_reader, writer, lock))]
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pipe in pipes:
                pipe.cancel()
            writer.close()
            upstream_writer.close()

    @staticmethod
    async def _go_away(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readexactly(24)  # the client's preface
            writer.write(h2_frame(4, 0, 0))  # SETTINGS (none)
            while True:
                head = await reader.readexactly(9)
                await reader.readexactly(int.from_bytes(head[:3], "big"))
                if head[3] == 4 and not head[4] & 1:  # the client's SETTINGS: ACK
                    writer.write(h2_frame(4, 1, 0))
                elif head[3] == 1:  # HEADERS: a call
                    writer.write(h2_frame(7, 0, 0, struct.pack(">II", 0, 0)))  # GOAWAY, last stream 0
                    await writer.drain()
                    await asyncio.sleep(0.2)
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _calls(reader: asyncio.StreamReader, upstream: asyncio.StreamWriter, client: asyncio.StreamWriter,
                     lock: asyncio.Lock, passed: int) -> None:
        """The client's frames to the server until call ``passed + 1``: that one gets GOAWAY
        naming the last passed stream, and nothing more reaches the server."""
        try:
            upstream.write(await reader.readexactly(24))  # the client's preface
            last = 0
            while True:
                head = await reader.readexactly(9)
                frame = head + await reader.readexactly(int.from_bytes(head[:3], "big"))
                stream_id = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
                if head[3] == 1 and stream_id > last:  # HEADERS opening a call
                    if not passed:
                        async with lock:
                            client.write(h2_frame(7, 0, 0, struct.pack(">II", last, 0)))
                        await asyncio.sleep(5)  # the client moves on to a new connection
                        return
                    passed -= 1
                    last = stream_id
                upstream.write(frame)
                await upstream.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass

    @staticmethod
    async def _frames(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, lock: asyncio.Lock) -> None:
        """The server's frames to the client, each whole."""
        try:
            while True:
                head = await reader.readexactly(9)
                frame = head + await reader.readexactly(int.from_bytes(head[:3], "big"))
                async with lock:
                    writer.write(frame)
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
        try:
            data = await reader.read(1 << 16)
            if delay:
                await asyncio.sleep(delay)
            while data:
                writer.write(data)
                await writer.drain()
                data = await reader.read(1 << 16)
        except ConnectionError:
            pass


def is_transport_error(outcome: Any, target: str, code: str) -> bool:
    return (isinstance(outcome, EnvironmentExecutionError) and outcome.payload.get("source") == "transport"
            and code in str(outcome) and target in str(outcome))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("warm", [False, True], ids=["connecting", "open-connection"])
@pytest.mark.parametrize("client", CLIENTS)
async def test_the_worker_is_killed_with_calls_in_flight(worker_factory: Any, client: str, tmp_path: Path,
                                                         warm: bool) -> None:
    """SIGKILL with runs in flight (docs/runtime.md, Re-delivery): ``requeue`` runs are delivered
    again to the worker restarted on the same port; ``cancel``, ``fail`` and ``detach`` runs
    end at once with a transport error (UNAVAILABLE); later calls work. Runs sent while the
    connection is being made wait in their own delivery; on an open connection (``warm``) the
    native client answers them in its callbacks, and a failure goes on to the re-delivery."""
    release, never = str(tmp_path / "release"), str(tmp_path / "never")
    worker = worker_factory()
    async with runtime(worker.target, client, reconnect_timeout=30) as rt:
        if warm:
            assert await asyncio.wait_for(rt.call_with("w", echo, ("warm",)), 20) == "warm"
        requeue = [asyncio.ensure_future(rt.call_with("w", hold, (release, i), delivery_orphan_policy="requeue"))
                   for i in range(8)]
        others = [asyncio.ensure_future(rt.call_with("w", hold, (never, -1), delivery_orphan_policy=policy))
                  for policy in ("cancel", "fail", "detach") for _ in range(4)]
        # every run reached the worker: a call sent after them comes back first
        assert await asyncio.wait_for(rt.call_with("w", echo, ("canary",)), 20) == "canary"
        await asyncio.to_thread(worker.kill)
        lost = await asyncio.wait_for(asyncio.gather(*others, return_exceptions=True), 30)
        assert all(is_transport_error(outcome, worker.target, "UNAVAILABLE") for outcome in lost), lost
        assert not any(call.done() for call in requeue)  # waiting for the worker to come back
        Path(release).touch()  # the re-deliveries return at once
        await asyncio.to_thread(worker_factory, port=worker.port)
        assert await asyncio.wait_for(asyncio.gather(*requeue), 60) == list(range(8))
        assert await asyncio.wait_for(rt.call_with("w", echo, ("after",)), 20) == "after"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("client", CLIENTS)
async def test_a_100_mib_argument_and_result_through_a_worker(worker_factory: Any, client: str) -> None:
    worker = worker_factory("--max-body-bytes", str(160 * MiB))
    big = os.urandom(100 * MiB)
    async with runtime(worker.target, client) as rt:
        assert await asyncio.wait_for(rt.call_with("w", echo, (big,)), 150) == big


@pytest.mark.timeout(90)
@pytest.mark.parametrize("client", CLIENTS)
async def test_the_worker_restarts_between_calls(worker_factory: Any, client: str) -> None:
    """A graceful stop (GOAWAY, then the connection closes) and a restart on the same port:
    the next call goes on a new connection and succeeds."""
    worker = worker_factory()
    async with runtime(worker.target, client) as rt:
        assert await asyncio.wait_for(rt.call_with("w", echo, (1,)), 20) == 1
        await asyncio.to_thread(worker.stop)
        await asyncio.to_thread(worker_factory, port=worker.port)
        assert await asyncio.wait_for(rt.call_with("w", echo, (2,)), 20) == 2
        assert await asyncio.wait_for(rt.call_with("w", echo, (3,)), 20) == 3


@pytest.mark.parametrize("client", CLIENTS)
async def test_the_idle_connection_gets_goaway(client: str) -> None:
    """The server's idle timeout sends GOAWAY and closes the connection between two calls."""
    running = await start_server(idle_timeout=0.2)
    try:
        async with Proxy(running.port) as proxy, runtime(proxy.target, client) as rt:
            assert await asyncio.wait_for(rt.call_with("w", echo, (1,)), 20) == 1
            await asyncio.sleep(1.5)  # well past the idle timeout
            assert await asyncio.wait_for(rt.call_with("w", echo, (2,)), 20) == 2
            assert proxy.connections >= 2
    finally:
        await running.stop(0.5)


@pytest.mark.parametrize("client", CLIENTS)
async def test_calls_the_server_did_not_process_go_once_more(server: GrpcWorkerServer, client: str) -> None:
    """GOAWAY naming none of the calls in flight as processed: grpc sends them once more on a
    new connection (its transparent retry), and so does the native client."""
    async with Proxy(server.port, refuse=range(1, 2)) as proxy, runtime(proxy.target, client, max_deliveries=1) as rt:
        results = await asyncio.wait_for(asyncio.gather(*(rt.call_with("w", echo, (i,)) for i in range(5))), 30)
        assert results == list(range(5))
        assert proxy.connections == 2


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_call_refused_twice_fails_unavailable(server: GrpcWorkerServer, client: str) -> None:
    """Only once: a call the second connection refuses too fails UNAVAILABLE (a transport error,
    delivered again per the re-delivery policy; here ``max_deliveries: 1``)."""
    async with Proxy(server.port, refuse=range(1, 1001)) as proxy, runtime(proxy.target, client, max_deliveries=1) as rt:
        with pytest.raises(EnvironmentExecutionError, match="GOAWAY") as info:
            await asyncio.wait_for(rt.call_with("w", echo, (1,)), 30)
        assert is_transport_error(info.value, proxy.target, "UNAVAILABLE")
        assert proxy.connections == 2


@pytest.mark.parametrize("refused_again", [False, True], ids=["served", "refused-again"])
async def test_a_call_goaway_leaves_unprocessed_on_an_open_connection_goes_once_more(
        server: GrpcWorkerServer, refused_again: bool) -> None:
    """The native client's call on an already-open connection (answered in its callbacks),
    left unprocessed by GOAWAY, goes once more on a new connection, as on the first call:
    served there, it succeeds; refused there too, it fails UNAVAILABLE with no third try."""
    refuse = range(2, 1001) if refused_again else range(0)
    async with Proxy(server.port, refuse=refuse, goaway_after=1) as proxy, \
            runtime(proxy.target, "native", max_deliveries=1) as rt:
        assert await asyncio.wait_for(rt.call_with("w", echo, (0,)), 20) == 0  # the connection is open
        if refused_again:
            with pytest.raises(EnvironmentExecutionError, match="GOAWAY") as info:
                await asyncio.wait_for(rt.call_with("w", echo, (1,)), 30)
            assert is_transport_error(info.value, proxy.target, "UNAVAILABLE")
        else:
            assert await asyncio.wait_for(rt.call_with("w", echo, (1,)), 30) == 1
        assert proxy.connections == 2


@pytest.mark.timeout(120)
@pytest.mark.parametrize("late_settings", [False, True], ids=["settings", "late-settings"])
@pytest.mark.parametrize("client", CLIENTS)
async def test_more_calls_than_max_concurrent_streams(client: str, late_settings: bool) -> None:
    """2,000 calls in flight to a server that allows 8 streams per connection (the worker
    advertises no limit by default; grpc's ``grpc.max_concurrent_streams``, with its overload
    protection off so that it counts HTTP/2 streams): calls beyond the limit wait. With the
    server's SETTINGS held back, calls started before they arrive wait for them (grpc's server
    refuses streams over its limit even before the client knows it)."""
    running = await start_server(options=[("grpc.max_concurrent_streams", 8), ("grpc.http.overload_protection", False)])
    try:
        async with Proxy(running.port, delay=0.3 if late_settings else 0.0) as proxy, \
                runtime(proxy.target, client) as rt:
            results = await asyncio.wait_for(asyncio.gather(*(rt.call_with("w", echo, (i,)) for i in range(2000))), 100)
        assert results == list(range(2000))
    finally:
        await running.stop(0.5)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("client", CLIENTS)
async def test_a_server_that_never_sends_settings(client: str) -> None:
    """A port that accepts and reads but never speaks HTTP/2: without a deadline the call still
    fails, UNAVAILABLE, once grpc's connect timeout (20 s) passes without the server's SETTINGS."""
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(1 << 16):
            pass
        writer.close()

    listener = await asyncio.start_server(silent, "127.0.0.1", 0)
    target = f"127.0.0.1:{listener.sockets[0].getsockname()[1]}"
    try:
        async with runtime(target, client, max_deliveries=1, reconnect_timeout=0.5) as rt:
            with pytest.raises(EnvironmentExecutionError, match="before receiving SETTINGS") as info:
                await asyncio.wait_for(rt.call_with("w", echo, (1,)), 45)
        assert is_transport_error(info.value, target, "UNAVAILABLE")
    finally:
        listener.close()


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_deadline_leaves_the_connection_usable(server: GrpcWorkerServer, client: str) -> None:
    async with Proxy(server.port) as proxy, runtime(proxy.target, client, timeout=1.0, max_deliveries=1) as rt:
        assert await asyncio.wait_for(rt.call_with("w", echo, ("first",)), 20) == "first"
        connections = proxy.connections
        with pytest.raises(EnvironmentExecutionError, match="DEADLINE_EXCEEDED") as info:
            await asyncio.wait_for(rt.call_with("w", asyncio.sleep, (10.0,), {"result": "late"}), 20)
        assert info.value.payload["source"] == "transport"
        assert "executor_config.timeout" in str(info.value)
        assert await asyncio.wait_for(rt.call_with("w", echo, ("next",)), 20) == "next"
        assert proxy.connections == connections  # the same connection carried the next call


@pytest.mark.timeout(120)
@pytest.mark.parametrize("client", CLIENTS)
async def test_many_results_larger_than_the_windows(server: GrpcWorkerServer, client: str) -> None:
    """32 concurrent 4 MiB arguments and results: each far over HTTP/2's initial windows
    (65,535 bytes for the connection, and the server's 4 MiB per stream), so both sides wait
    for WINDOW_UPDATEs with many streams blocked at once."""
    values = [os.urandom(4 * MiB) for _ in range(32)]
    async with runtime(server.target, client) as rt:
        results = await asyncio.wait_for(asyncio.gather(*(rt.call_with("w", echo, (v,)) for v in values)), 100)
    assert results == values


@pytest.mark.parametrize("client", CLIENTS)
async def test_calls_on_an_open_connection(server: GrpcWorkerServer, client: str, tmp_path: Path) -> None:
    """Once the connection is open, the native client answers each call in its callbacks (no
    task per call): results, the worker's errors and a cancelled run read as on the first
    call, and the connection stays usable."""
    async with runtime(server.target, client, max_deliveries=1) as rt:
        assert await asyncio.wait_for(rt.call_with("w", echo, (0,)), 20) == 0
        results = await asyncio.wait_for(asyncio.gather(*(rt.call_with("w", echo, (i,)) for i in range(500))), 30)
        assert results == list(range(500))
        with pytest.raises(ValueError, match="from the worker"):
            await asyncio.wait_for(rt.call_with("w", fail, ("from the worker",)), 20)
        held = asyncio.ensure_future(rt.call_with("w", hold, (str(tmp_path / "never"), 1)))
        assert await asyncio.wait_for(rt.call_with("w", echo, ("after",)), 20) == "after"  # held reached it
        held.cancel()
        with pytest.raises(asyncio.CancelledError):
            await held
        assert await asyncio.wait_for(rt.call_with("w", echo, ("still",)), 20) == "still"
