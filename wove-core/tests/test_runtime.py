"""ExecutorRuntime semantics, against the local executor and small fake executors."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from wove.environment import (
    DeliveryOrphanedError,
    DeliveryTimeoutError,
    EnvironmentExecutionError,
    EnvironmentExecutor,
    ExecutorRuntime,
    LocalEnvironmentExecutor,
)
from wove.errors import ConfigError


class ScriptedExecutor(EnvironmentExecutor):
    """Records commands; events are pushed by the test."""

    def __init__(self, auto: bool = False) -> None:
        self.sent: list[dict[str, Any]] = []
        self.events: asyncio.Queue[Any] = asyncio.Queue()
        self.auto = auto
        self.stopped = False
        self.config: dict[str, Any] | None = None

    async def start(self, *, environment_name: str, environment_config: dict[str, Any], run_config: dict[str, Any]) -> None:
        self.config = environment_config

    async def send(self, frame: dict[str, Any]) -> None:
        self.sent.append(frame)
        if self.auto and frame["type"] == "run_task":
            await self.events.put({"type": "task_result", "run_id": frame["run_id"], "task_id": frame["task_id"],
                                   "result": frame["callable"](**frame["args"])})

    async def recv(self) -> dict[str, Any]:
        item = await self.events.get()
        if isinstance(item, BaseException):
            raise item
        return item

    async def stop(self) -> None:
        self.stopped = True

    def runs(self) -> list[dict[str, Any]]:
        return [f for f in self.sent if f["type"] == "run_task"]

    def cancels(self) -> list[dict[str, Any]]:
        return [f for f in self.sent if f["type"] == "cancel_task"]


async def wait_for_runs(executor: ScriptedExecutor, count: int) -> list[dict[str, Any]]:
    for _ in range(200):
        if len(executor.runs()) >= count:
            return executor.runs()
        await asyncio.sleep(0.01)
    raise AssertionError(f"expected {count} run_task frames, got {executor.runs()}")


def noop() -> None:
    return None


async def test_call_runs_sync_and_async_functions() -> None:
    async def double(x: int) -> int:
        return 2 * x

    async with ExecutorRuntime({"here": {"executor": "local"}}, {}) as runtime:
        assert await runtime.call("here", double, 21) == 42
        assert await runtime.call("here", divmod, 7, 2) == (3, 1)  # positional-only builtin
        assert await runtime.call("here", lambda *xs, k=0: sum(xs) + k, 1, 2, k=3) == 6
        assert runtime.is_local_environment("here")


async def test_a_local_sync_task_raising_stop_iteration_fails_without_hanging_later_calls() -> None:
    def exhausted() -> int:
        return next(iter([]))

    async with ExecutorRuntime({"here": {"executor": "local"}}, {}) as runtime:
        with pytest.raises(RuntimeError, match="StopIteration") as caught:
            await asyncio.wait_for(runtime.call("here", exhausted), 5)
        assert isinstance(caught.value.__cause__, StopIteration)
        assert await asyncio.wait_for(runtime.call("here", divmod, 7, 2), 5) == (3, 1)


async def test_run_task_seed_signature_and_default_environment() -> None:
    async with ExecutorRuntime({"a": {"executor": "local"}}, {"default_environment": "a"}) as runtime:
        result = await runtime.run_task(task_name="t", task_func=lambda x: x + 1, task_args={"x": 1}, task_info={})
        assert result == 2


async def test_unknown_environment_is_a_name_error() -> None:
    async with ExecutorRuntime({"a": {"executor": "local"}}, {}) as runtime:
        with pytest.raises(NameError, match=r"unknown environment 'b'.*Known environments: a"):
            await runtime.run_task(task_name="t", task_func=noop, task_args={}, task_info={"environment": "b"})


@pytest.mark.parametrize(("key", "value", "allowed"), [
    ("delivery_cancel_mode", "eventually", "'best_effort', 'require_ack'"),
    ("delivery_orphan_policy", "shrug", "'fail', 'cancel', 'requeue', 'detach'"),
])
async def test_invalid_policies_are_value_errors(key: str, value: str, allowed: str) -> None:
    async with ExecutorRuntime({"a": {"executor": "local"}}, {}) as runtime:
        with pytest.raises(ValueError, match=f"{key} must be one of {allowed}, got '{value}'"):
            await runtime.run_task(task_name="t", task_func=noop, task_args={}, task_info={"environment": "a", key: value})
    with pytest.raises(ValueError, match=key):
        async with ExecutorRuntime({"a": {key: value}}, {}):
            pass


async def test_settings_resolve_task_info_then_definition_then_run_config() -> None:
    executor = ScriptedExecutor(auto=True)
    definitions = {"a": {"executor": executor, "delivery_orphan_policy": "fail", "delivery_timeout": 30}}
    run_config = {"delivery_orphan_policy": "detach", "delivery_heartbeat_seconds": 20, "delivery_timeout": 99}
    async with ExecutorRuntime(definitions, run_config) as runtime:
        await runtime.call_with("a", noop)
        await runtime.call_with("a", noop, delivery_orphan_policy="requeue", delivery_idempotency_key="k")
    first, second = (f["delivery"] for f in executor.runs())
    assert first == {"delivery_cancel_mode": "best_effort", "delivery_orphan_policy": "fail",
                     "delivery_timeout": 30, "delivery_heartbeat_seconds": 20,
                     "delivery_capture_output": True}  # capture_output (default true) asks for the run's output
    assert second["delivery_orphan_policy"] == "requeue"
    assert second["delivery_idempotency_key"] == "k"


async def test_idempotency_key_forms() -> None:
    executor = ScriptedExecutor(auto=True)

    def report(day: str, region: str) -> str:
        return day + region

    async with ExecutorRuntime({"a": {"executor": executor}}, {}) as runtime:
        await runtime.call_with("a", report, ("mon", "eu"), delivery_idempotency_key="report-{day}-{region}")
        await runtime.call_with("a", report, ("tue", "us"), delivery_idempotency_key=lambda args: f"cb-{args['day']}")
        await runtime.call_with("a", report, ("wed", "us"), delivery_idempotency_key=lambda day, region: f"kw-{day}")
        with pytest.raises(ValueError, match=r"could not be formatted.*available: day, region"):
            await runtime.call_with("a", report, ("x", "y"), delivery_idempotency_key="{missing}")
    keys = [f["delivery"]["delivery_idempotency_key"] for f in executor.runs()]
    assert keys == ["report-mon-eu", "cb-tue", "kw-wed"]


async def test_delivery_timeout_raises_and_sends_cancel() -> None:
    executor = ScriptedExecutor()
    async with ExecutorRuntime({"a": {"executor": executor}}, {}) as runtime:
        with pytest.raises(DeliveryTimeoutError, match=r"environment 'a' did not finish within delivery_timeout=0.2s"):
            await asyncio.wait_for(runtime.call_with("a", noop, delivery_timeout=0.2), 10)
        [cancel] = executor.cancels()
        assert cancel["run_id"] == executor.runs()[0]["run_id"]


async def test_heartbeat_expiry_raises_and_heartbeats_extend_the_window() -> None:
    executor = ScriptedExecutor()
    async with ExecutorRuntime({"a": {"executor": executor}}, {}) as runtime:
        call = asyncio.ensure_future(runtime.call_with("a", noop, delivery_heartbeat_seconds=0.3))
        [frame] = await wait_for_runs(executor, 1)
        ids = {"run_id": frame["run_id"], "task_id": frame["task_id"]}
        for _ in range(5):  # 1 s of heartbeats every 0.2 s keeps a 0.3 s window alive
            await asyncio.sleep(0.2)
            await executor.events.put({"type": "heartbeat", **ids})
        assert not call.done()
        with pytest.raises(DeliveryTimeoutError, match=r"sent no heartbeat .*delivery_heartbeat_seconds=0.3"):
            await call
        assert [c["run_id"] for c in executor.cancels()] == [frame["run_id"]]


async def test_require_ack_reports_whether_cancellation_was_confirmed() -> None:
    executor = ScriptedExecutor()

    async def ack_cancels() -> None:
        while True:
            await asyncio.sleep(0.01)
            for cancel in executor.cancels():
                if not cancel.get("acked"):
                    cancel["acked"] = True
                    await executor.events.put({"type": "task_cancelled", "run_id": cancel["run_id"], "task_id": cancel["task_id"]})

    async with ExecutorRuntime({"a": {"executor": executor, "delivery_cancel_mode": "require_ack"}}, {}) as runtime:
        acker = asyncio.ensure_future(ack_cancels())
        with pytest.raises(DeliveryTimeoutError, match="confirmed the cancellation"):
            await runtime.call_with("a", noop, delivery_timeout=0.1)
        acker.cancel()
        from wove import runtime as runtime_module

        runtime_module.CANCEL_ACK_TIMEOUT, saved = 0.2, runtime_module.CANCEL_ACK_TIMEOUT
        try:
            with pytest.raises(DeliveryTimeoutError, match=r"did not confirm the cancellation within 0\.2s"):
                await runtime.call_with("a", noop, delivery_timeout=0.1)
        finally:
            runtime_module.CANCEL_ACK_TIMEOUT = saved


async def test_max_in_flight_caps_outstanding_runs() -> None:
    executor = ScriptedExecutor()
    async with ExecutorRuntime({"a": {"executor": executor, "delivery_max_in_flight": 3}}, {}) as runtime:
        calls = [asyncio.ensure_future(runtime.call("a", noop)) for _ in range(10)]
        await wait_for_runs(executor, 3)
        await asyncio.sleep(0.05)
        assert len(executor.runs()) == 3
        for _ in range(10):
            await wait_for_runs(executor, 1)
            frame = next(f for f in executor.runs() if not f.get("answered"))
            frame["answered"] = True
            await executor.events.put({"type": "task_result", "run_id": frame["run_id"], "task_id": frame["task_id"], "result": 1})
            await asyncio.sleep(0.01)
            outstanding = [f for f in executor.runs() if not f.get("answered")]
            assert len(outstanding) <= 3
        assert await asyncio.gather(*calls) == [1] * 10


async def test_events_map_to_results_and_exceptions() -> None:
    executor = ScriptedExecutor()
    async with ExecutorRuntime({"a": {"executor": executor}}, {}) as runtime:
        calls = [asyncio.ensure_future(runtime.call("a", noop)) for _ in range(4)]
        frames = await wait_for_runs(executor, 4)
        ids = [{"run_id": f["run_id"], "task_id": f["task_id"]} for f in frames]
        await executor.events.put({"type": "log", "message": "hello from the worker"})
        await executor.events.put({"type": "task_error", **ids[0], "exception": KeyError("k"), "error": {"kind": "KeyError"}})
        await executor.events.put({"type": "task_error", **ids[1], "error": {"kind": "Boom", "message": "remote boom", "source": "transport"}})
        await executor.events.put({"type": "task_cancelled", **ids[2]})
        await executor.events.put({"type": "surprise", **ids[3]})
        results = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(results[0], KeyError)
    assert isinstance(results[1], EnvironmentExecutionError) and results[1].payload["kind"] == "Boom"
    assert "remote boom" in str(results[1])
    assert isinstance(results[2], asyncio.CancelledError)
    assert isinstance(results[3], RuntimeError) and "Unknown executor frame type 'surprise'" in str(results[3])
    assert not executor.cancels(), "an executor-reported cancellation needs no cancel_task"


async def test_a_worker_reporting_stop_iteration_fails_that_call_alone() -> None:
    # A Wove 2.x worker that runs a sync task on its loop sends the StopIteration it raised;
    # an asyncio future refuses one, so the call fails with RuntimeError (its cause) instead.
    executor = ScriptedExecutor()
    async with ExecutorRuntime({"a": {"executor": executor}}, {}) as runtime:
        calls = [asyncio.ensure_future(runtime.call("a", noop)) for _ in range(2)]
        frames = await wait_for_runs(executor, 2)
        await executor.events.put({"type": "task_error", "run_id": frames[0]["run_id"], "task_id": frames[0]["task_id"],
                                   "exception": StopIteration("gone"), "error": {"kind": "StopIteration"}})
        await executor.events.put({"type": "task_result", "run_id": frames[1]["run_id"],
                                   "task_id": frames[1]["task_id"], "result": 2})
        results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
    assert isinstance(results[0], RuntimeError) and isinstance(results[0].__cause__, StopIteration)
    assert results[1] == 2


async def test_receiver_death_fails_pending_runs_fast_and_later_ones_too() -> None:
    executor = ScriptedExecutor()
    async with ExecutorRuntime({"a": {"executor": executor}}, {}) as runtime:
        first = asyncio.ensure_future(runtime.call("a", noop))
        second = asyncio.ensure_future(runtime.call_with("a", noop, delivery_orphan_policy="fail"))
        await wait_for_runs(executor, 2)
        await executor.events.put(ConnectionResetError("pipe closed"))
        with pytest.raises(RuntimeError, match=r"environment 'a' cannot finish: executor ScriptedExecutor stopped delivering events \(ConnectionResetError: pipe closed\)"):
            await first
        with pytest.raises(DeliveryOrphanedError, match="delivery_orphan_policy='fail'"):
            await second
        with pytest.raises(RuntimeError, match="Environment 'a' cannot run task 'noop'"):
            await runtime.call("a", noop)


@pytest.mark.parametrize(("policy", "expected", "cancel_sent"), [
    ("cancel", asyncio.CancelledError, True),
    ("fail", DeliveryOrphanedError, True),
    ("requeue", DeliveryOrphanedError, True),
    ("detach", DeliveryOrphanedError, False),
])
async def test_stop_orphans_pending_runs_by_policy(policy: str, expected: type[BaseException], cancel_sent: bool) -> None:
    executor = ScriptedExecutor()
    runtime = ExecutorRuntime({"a": {"executor": executor}}, {})
    await runtime.start()
    call = asyncio.ensure_future(runtime.call_with("a", noop, delivery_orphan_policy=policy))
    await wait_for_runs(executor, 1)
    await runtime.stop()
    with pytest.raises(expected):
        await call
    assert bool(executor.cancels()) is cancel_sent
    assert executor.sent[-1]["type"] == "shutdown"
    assert executor.stopped


async def test_caller_cancellation_sends_cancel_task_and_local_task_is_cancelled() -> None:
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with ExecutorRuntime({"a": {"executor": "local"}}, {}) as runtime:
        call = asyncio.ensure_future(runtime.call("a", forever))
        await asyncio.sleep(0.05)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await asyncio.wait_for(cancelled.wait(), 2)


@pytest.mark.parametrize("burst", [0, 5000], ids=["fresh", "after-a-burst-of-quick-calls"])
async def test_blocking_sync_tasks_do_not_stall_the_loop(burst: int) -> None:
    running = 0
    most = 0
    lock = threading.Lock()
    release = threading.Event()

    def blocking() -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        release.wait(10)  # blocks its thread until the loop, still free, lets every run go
        with lock:
            running -= 1

    async with ExecutorRuntime({"a": {"executor": "local", "max_workers": 32}}, {}) as runtime:
        # quick calls, many in flight: a few threads serve them all, and whatever they leave
        # behind must not keep the pool from starting a thread for each blocking call
        async def lane(count: int) -> None:
            for _ in range(count):
                await runtime.call("a", abs, -1)

        await asyncio.gather(*(lane(burst // 256) for _ in range(256)))
        calls = asyncio.gather(*(runtime.call("a", blocking) for _ in range(32)))
        for _ in range(1000):  # the loop keeps turning while 32 sync calls block their threads
            await asyncio.sleep(0.005)
            if most == 32:
                break
        release.set()
        await asyncio.wait_for(calls, 10)
    assert most == 32, "all 32 blocking calls ran at once, each on its own thread"


async def test_executor_instance_class_and_start_failure_note() -> None:
    class Broken(ScriptedExecutor):
        async def start(self, **kwargs: Any) -> None:
            raise OSError("cannot reach the worker")

    async with ExecutorRuntime({"i": {"executor": LocalEnvironmentExecutor()}, "c": {"executor": LocalEnvironmentExecutor}}, {}) as runtime:
        assert await runtime.call("i", abs, -1) == 1
        assert await runtime.call("c", abs, -2) == 2
    with pytest.raises(OSError, match="cannot reach the worker") as info:
        async with ExecutorRuntime({"b": {"executor": Broken()}}, {}):
            pass
    assert "while starting environment 'b'" in "".join(getattr(info.value, "__notes__", []))


async def test_unknown_executor_name_in_definition() -> None:
    with pytest.raises(ValueError, match=r"Unknown executor 'lokal' in environment 'x'.*Did you mean 'local'"):
        async with ExecutorRuntime({"x": {"executor": "lokal"}}, {}):
            pass


async def test_max_workers_reaches_only_an_executor_whose_options_have_it() -> None:
    class RecordingLocal(LocalEnvironmentExecutor):
        config: dict[str, Any] | None = None

        async def start(self, *, environment_name: str, environment_config: dict[str, Any],
                        run_config: dict[str, Any]) -> None:
            self.config = environment_config
            await super().start(environment_name=environment_name, environment_config=environment_config,
                                run_config=run_config)

    local = RecordingLocal()
    definition = {"executor": local, "max_workers": 3, "executor_config": {"max_concurrency": 5}}
    async with ExecutorRuntime({"a": definition}, {}):
        assert local.config == {"max_concurrency": 5, "max_workers": 3}
    other = ScriptedExecutor()
    with pytest.raises(ConfigError, match=r"Environment 'b': max_workers = 3 sizes the thread pool of the local "
                                          r"executor; the ScriptedExecutor executor has no such setting\. Remove"):
        async with ExecutorRuntime({"b": {"executor": other, "max_workers": 3, "executor_config": {"x": 1}}}, {}):
            pass
    assert other.config is None, "rejected before the executor started"


async def test_a_definition_without_executor_is_a_config_error_unless_named_local() -> None:
    with pytest.raises(ConfigError, match=r"Environment 'a' names no executor\. Add executor = \"local\""):
        async with ExecutorRuntime({"a": {"delivery_timeout": 5}}, {}):
            pass
    async with ExecutorRuntime({"local": {"delivery_timeout": 5}}, {}) as runtime:
        assert runtime.is_local_environment("local")
        assert await runtime.call("local", abs, -3) == 3


@pytest.mark.parametrize(("policy", "expected"), [
    ("cancel", asyncio.CancelledError),
    ("fail", DeliveryOrphanedError),
    ("detach", DeliveryOrphanedError),
])
async def test_in_process_inline_runs_are_orphaned_by_policy(policy: str, expected: type[BaseException]) -> None:
    runtime = ExecutorRuntime({"a": {"executor": "local"}}, {})
    await runtime.start()
    call = asyncio.ensure_future(runtime.call_with("a", asyncio.sleep, (30,), delivery_orphan_policy=policy))
    await asyncio.sleep(0.05)
    await runtime.stop()
    with pytest.raises(expected):
        await asyncio.wait_for(call, 2)


async def test_in_process_runs_respect_max_concurrency_and_timeout() -> None:
    running = peak = 0

    async def work() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.02)
        running -= 1

    async with ExecutorRuntime({"a": {"executor": "local", "executor_config": {"max_concurrency": 3}}}, {}) as runtime:
        await asyncio.gather(*(runtime.call("a", work) for _ in range(20)))
        assert peak == 3
        with pytest.raises(DeliveryTimeoutError, match=r"delivery_timeout=0\.1s; the in-process run was cancelled"):
            await runtime.call_with("a", asyncio.sleep, (5,), delivery_timeout=0.1)
        # an idempotency key routes through the engine's deduplication instead
        results = await asyncio.gather(*(runtime.call_with("a", asyncio.sleep, (0.05, "r"), delivery_idempotency_key="same") for _ in range(3)))
        assert results == ["r", "r", "r"]


class AwaitingScripted(ScriptedExecutor):
    """Answers each run_task itself, awaiting async callables."""

    def __init__(self) -> None:
        super().__init__()
        self.inline_calls: list[str] = []

    async def send(self, frame: dict[str, Any]) -> None:
        self.sent.append(frame)
        if frame["type"] == "run_task":
            result = frame["callable"](**frame["args"])
            if asyncio.iscoroutine(result):
                result = await result
            await self.events.put({"type": "task_result", "run_id": frame["run_id"], "task_id": frame["task_id"],
                                   "result": result})


class InlineScripted(AwaitingScripted):
    """A non-local executor that declares runs_inline: the runtime awaits async calls through it."""

    runs_inline = True

    async def run_inline(self, func: Any, args: dict[str, Any]) -> Any:
        self.inline_calls.append(func.__name__)
        return await func(**args)


async def test_any_executor_declaring_runs_inline_gets_async_calls_inline() -> None:
    async def double(x: int) -> int:
        return 2 * x

    def triple(x: int) -> int:
        return 3 * x

    executor = InlineScripted()
    async with ExecutorRuntime({"a": {"executor": executor}}, {}) as runtime:
        assert runtime.is_local_environment("a")
        assert await runtime.call("a", double, 4) == 8
        assert await runtime.call("a", triple, 4) == 12  # sync: frames
        assert await runtime.call_with("a", double, (5,), delivery_idempotency_key="k") == 10  # keyed: frames
        with pytest.raises(DeliveryTimeoutError, match=r"delivery_timeout=0\.05s"):
            await runtime.call_with("a", asyncio.sleep, (5,), delivery_timeout=0.05)
    assert executor.inline_calls == ["double", "sleep"]
    assert [f["task_id"] for f in executor.runs()] == ["triple", "double"]


async def test_executors_without_runs_inline_and_local_subclasses_get_frames() -> None:
    async def double(x: int) -> int:
        return 2 * x

    class CountingLocal(LocalEnvironmentExecutor):
        frames: list[str] = []

        async def send(self, frame: dict[str, Any]) -> None:
            self.frames.append(frame["type"])
            await super().send(frame)

    plain, counting = AwaitingScripted(), CountingLocal()
    assert not plain.runs_inline and not counting.runs_inline and LocalEnvironmentExecutor.runs_inline
    async with ExecutorRuntime({"p": {"executor": plain}, "c": {"executor": counting}}, {}) as runtime:
        assert not runtime.is_local_environment("p")
        assert await runtime.call("p", double, 1) == 2
        assert await runtime.call("c", double, 2) == 4
    assert [f["task_id"] for f in plain.runs()] == ["double"]
    assert counting.frames[0] == "run_task"
