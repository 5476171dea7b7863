"""Outcomes through the engine's own channel, signed-by-default callbacks, and HTTPS callbacks.

An in-process "engine" runs each payload with ``run_engine_payload_sync`` on a thread and
hands its return value (the engine status) to ``BackendAdapter.settle``, as a real engine's
result backend would.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from wove.backend import (
    BackendAdapter,
    BackendAdapterEnvironmentExecutor,
    engine_status,
    run_engine_payload,
    run_engine_payload_sync,
)
from wove.environment import ExecutorRuntime
from wove.errors import ConfigError
from wove.protocol import encode_event
from wove.testing import tasks

pytestmark = pytest.mark.timeout(60)

UNREACHABLE = "http://127.0.0.1:9/wove/events/unreachable-token-0123456789"


class EngineThreadAdapter(BackendAdapter):
    """Runs each payload on a thread; its return value comes back as an engine result would."""

    statuses: list[dict[str, Any]] = []
    payloads: list[dict[str, Any]] = []

    async def submit(self, payload: dict[str, Any], frame: dict[str, Any]) -> Any:
        EngineThreadAdapter.payloads.append(payload)
        if "worker_callback_url" in self.config:  # what the worker is told, not where the server is
            payload = {**payload, "callback_url": self.config["worker_callback_url"]}
        future = asyncio.get_running_loop().run_in_executor(None, run_engine_payload_sync, payload)
        watcher = asyncio.ensure_future(self._follow(payload["run_id"], future))
        return watcher

    async def _follow(self, run_id: str, future: asyncio.Future[dict[str, Any]]) -> None:
        status = await future
        EngineThreadAdapter.statuses.append(status)
        await self.settle(run_id, status, what=f"thread task {run_id}", grace=0.5)


def _runtime(**config: Any) -> ExecutorRuntime:
    executor = BackendAdapterEnvironmentExecutor("enginethread", EngineThreadAdapter)
    return ExecutorRuntime({"e": {"executor": executor, "executor_config": config}}, {})


@pytest.fixture(autouse=True)
def _clear() -> None:
    EngineThreadAdapter.statuses.clear()
    EngineThreadAdapter.payloads.clear()


async def test_an_unreachable_callback_url_still_returns_results_errors_and_output_through_the_engine() -> None:
    async with _runtime(worker_callback_url=UNREACHABLE) as runtime:
        assert await runtime.call("e", tasks.add, 20, 22) == 42
        with pytest.raises(tasks.ContractTaskError, match="through the engine"):
            await runtime.call("e", tasks.fail, "through the engine")
        # a second run in this process skips the unreachable server at once (no retries)
        assert await runtime.call("e", tasks.add, 1, 2) == 3
    assert [s["posted"] for s in EngineThreadAdapter.statuses] == [False, False, False]
    assert all(p["result_channel"] == "auto" for p in EngineThreadAdapter.payloads)


async def test_result_channel_engine_never_posts_the_outcome_and_callback_does() -> None:
    async with _runtime(result_channel="engine") as runtime:
        assert await runtime.call("e", tasks.add, 2, 3) == 5
    assert [s["posted"] for s in EngineThreadAdapter.statuses] == [False]
    EngineThreadAdapter.statuses.clear()
    async with _runtime(result_channel="callback") as runtime:
        assert await runtime.call("e", tasks.add, 2, 3) == 5
    assert EngineThreadAdapter.statuses == [
        {"wove_status": 1, "posted": True, "type": "task_result", "run_id": EngineThreadAdapter.payloads[-1]["run_id"]}
    ]


async def test_result_channel_callback_retries_the_callback_then_still_falls_back_to_the_engine() -> None:
    async with _runtime(result_channel="callback", worker_callback_url=UNREACHABLE) as runtime:
        assert await asyncio.wait_for(runtime.call("e", tasks.add, 1, 1), 30) == 2
    assert [s["posted"] for s in EngineThreadAdapter.statuses] == [False]


async def test_an_engine_result_without_a_wove_outcome_ends_the_run_with_an_error_naming_the_task() -> None:
    """What a Wove 2.x worker returns carries no outcome: without its callback the run ends, it does not hang."""
    executor = BackendAdapterEnvironmentExecutor("x", IdleAdapter)
    await executor.start(environment_name="e", environment_config={}, run_config={})
    try:
        adapter = executor.adapter
        assert adapter is not None
        await executor.send({"type": "run_task", "run_id": "add:1", "task_id": "add", "callable": tasks.add,
                             "args": {"a": 1, "b": 2}, "delivery": {}})
        await adapter.settle("add:1", 3, what="engine job 17", grace=0.1)
        event = await asyncio.wait_for(executor.recv(), 5)
        assert event["type"] == "task_error"
        assert "engine job 17 finished but no callback arrived" in event["error"]["message"]
    finally:
        await executor.stop()


async def test_a_bad_result_channel_is_a_config_error_naming_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"result_channel must be one of 'auto', 'callback', 'engine', got 'ray'"):
        await BackendAdapterEnvironmentExecutor("x", EngineThreadAdapter).start(
            environment_name="e", environment_config={"result_channel": "ray"}, run_config={})


async def test_settle_delivers_only_the_run_it_was_given() -> None:
    """An engine result naming another run is not delivered to this one."""
    executor = BackendAdapterEnvironmentExecutor("x", IdleAdapter)
    await executor.start(environment_name="e", environment_config={}, run_config={})
    try:
        adapter = executor.adapter
        assert isinstance(adapter, IdleAdapter)
        frame = {"type": "run_task", "run_id": "add:1", "task_id": "add", "callable": tasks.add,
                 "args": {"a": 1, "b": 2}, "delivery": {}}
        await executor.send(frame)
        other = engine_status({"type": "task_result", "run_id": "add:2", "task_id": "add", "result": 99}, False)
        await adapter.settle("add:1", other, what="a forged engine result")
        event = await asyncio.wait_for(executor.recv(), 5)
        assert event["type"] == "task_error" and "another run" in event["error"]["message"]
    finally:
        await executor.stop()


class IdleAdapter(BackendAdapter):
    """Accepts submissions and never runs them (the test posts callbacks itself)."""

    async def submit(self, payload: dict[str, Any], frame: dict[str, Any]) -> Any:
        IdleAdapter.last = payload
        return None

    last: dict[str, Any] = {}


async def test_callbacks_must_be_signed_by_default_a_leaked_url_cannot_forge_a_result() -> None:
    executor = BackendAdapterEnvironmentExecutor("idle", IdleAdapter)
    await executor.start(environment_name="e", environment_config={}, run_config={})
    try:
        assert executor.adapter is not None
        frame = {"type": "run_task", "run_id": "add:1", "task_id": "add", "callable": tasks.add,
                 "args": {"a": 1, "b": 2}, "delivery": {}}
        await executor.send(frame)
        forged = encode_event({"type": "task_result", "run_id": "add:1", "task_id": "add", "result": 666})
        async with httpx.AsyncClient() as client:
            refused = await client.post(executor.adapter.callback_url, content=forged)
        assert refused.status_code == 403
        # the real worker (holding the payload's key) gets through
        status = await run_engine_payload(IdleAdapter.last)
        assert status["posted"] is True
        event = await asyncio.wait_for(executor.recv(), 5)
        assert event["type"] == "task_result" and event["result"] == 3
    finally:
        await executor.stop()


@pytest.fixture
def loopback_pki(tmp_path: Any) -> dict[str, str]:
    """A throwaway CA and a certificate for 127.0.0.1 (PEM files)."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    files = {"ca": str(tmp_path / "ca.pem"), "cert": str(tmp_path / "cert.pem"), "key": str(tmp_path / "key.pem")}
    ca.cert_pem.write_to_path(files["ca"])
    cert.cert_chain_pems[0].write_to_path(files["cert"])
    cert.private_key_pem.write_to_path(files["key"])
    return files


async def test_callbacks_over_https_verified_with_the_ca_in_the_payload(loopback_pki: dict[str, str]) -> None:
    config = {"callback_tls_cert_file": loopback_pki["cert"], "callback_tls_key_file": loopback_pki["key"],
              "callback_tls_ca_file": loopback_pki["ca"]}
    async with _runtime(**config) as runtime:
        assert await runtime.call("e", tasks.add, 4, 5) == 9
    payload = EngineThreadAdapter.payloads[-1]
    assert payload["callback_url"].startswith("https://127.0.0.1:")
    assert "BEGIN CERTIFICATE" in payload["callback_ca"]
    assert EngineThreadAdapter.statuses[-1]["posted"] is True  # it went over HTTPS, verified with the CA


async def test_a_worker_without_the_ca_does_not_post_to_an_unverified_server(loopback_pki: dict[str, str]) -> None:
    config = {"callback_tls_cert_file": loopback_pki["cert"], "callback_tls_key_file": loopback_pki["key"],
              "result_channel": "callback"}
    executor = BackendAdapterEnvironmentExecutor("idle", IdleAdapter)
    await executor.start(environment_name="e", environment_config=config, run_config={})
    try:
        await executor.send({"type": "run_task", "run_id": "add:1", "task_id": "add", "callable": tasks.add,
                             "args": {"a": 4, "b": 5}, "delivery": {}})
        assert "callback_ca" not in IdleAdapter.last  # no CA configured: the system's CAs verify
        status = await run_engine_payload(IdleAdapter.last)
        assert status["posted"] is False  # the throwaway CA is not trusted: nothing was sent
    finally:
        await executor.stop()


async def test_https_callback_keys_need_a_certificate(pki: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="need callback_tls_cert_file"):
        await BackendAdapterEnvironmentExecutor("idle", IdleAdapter).start(
            environment_name="e", environment_config={"callback_tls_ca_file": pki["ca"]}, run_config={})


class MissingModuleAdapter(BackendAdapter):
    required_modules = ("wove_no_such_engine_module",)
    install_hint = "wove-executor-nosuch"


async def test_a_missing_engine_module_names_it_and_how_to_install_from_the_index_or_a_checkout() -> None:
    with pytest.raises(RuntimeError, match="needs the module") as info:
        await BackendAdapterEnvironmentExecutor("nosuch", MissingModuleAdapter).start(
            environment_name="e", environment_config={}, run_config={})
    message = str(info.value)
    assert "'wove_no_such_engine_module'" in message and "environment 'e'" in message
    assert "pip install wove-executor-nosuch (from a checkout of this project: pip install ./wove-core " \
           "./wove-backend ./wove-executor-nosuch" in message


async def test_a_heartbeat_the_caller_refuses_with_404_cancels_the_run_on_the_worker() -> None:
    """The caller stopped waiting (timed out, cancelled): the worker stops too, on any engine."""
    executor = BackendAdapterEnvironmentExecutor("idle", IdleAdapter)
    await executor.start(environment_name="e", environment_config={}, run_config={})
    try:
        await executor.send({"type": "run_task", "run_id": "sleep:1", "task_id": "sleep", "callable": tasks.sleep,
                             "args": {"seconds": 30.0}, "delivery": {"delivery_heartbeat_seconds": 0.3}})
        worker = asyncio.ensure_future(run_engine_payload(IdleAdapter.last))
        await asyncio.sleep(0.5)
        await executor.send({"type": "cancel_task", "run_id": "sleep:1", "task_id": "sleep"})
        status = await asyncio.wait_for(worker, 10)  # not the task's 30 s
        assert status["type"] == "task_cancelled"
    finally:
        await executor.stop()


async def test_a_keyed_run_is_not_cancelled_by_a_refused_heartbeat() -> None:
    """Its engine job may serve a later run with the same idempotency key."""
    executor = BackendAdapterEnvironmentExecutor("idle", IdleAdapter)
    await executor.start(environment_name="e", environment_config={}, run_config={})
    try:
        await executor.send({"type": "run_task", "run_id": "sleep:1", "task_id": "sleep", "callable": tasks.sleep,
                             "args": {"seconds": 1.5},
                             "delivery": {"delivery_heartbeat_seconds": 0.3, "delivery_idempotency_key": "k1"}})
        assert IdleAdapter.last["keep_outcome"] is True
        worker = asyncio.ensure_future(run_engine_payload(IdleAdapter.last))
        await asyncio.sleep(0.5)
        await executor.send({"type": "cancel_task", "run_id": "sleep:1", "task_id": "sleep"})
        status = await asyncio.wait_for(worker, 10)
        assert status["type"] == "task_result" and "event" in status
    finally:
        await executor.stop()
