"""Plugin registration, import weight, executor_config validation and start-up errors (no worker needed)."""

from __future__ import annotations

import socket
import subprocess
import sys
from typing import Any

import pytest

from wove.backend import BackendAdapterEnvironmentExecutor, get_backend_adapter_class
from wove.environment import ExecutorRuntime, build_executor_from_name
from wove.errors import ConfigError
from wove_executor_celery import CELERY_OPTIONS, CeleryAdapter, celery_task_id, register_wove_task


def test_plugin_import_does_not_import_celery() -> None:
    code = ("import sys, wove_executor_celery, wove_executor_celery.plugin; "
            "print(sorted(m for m in ('celery', 'kombu', 'redis', 'uvicorn', 'cloudpickle') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_resolves_by_name_and_adapter_lookup() -> None:
    assert isinstance(build_executor_from_name("celery"), BackendAdapterEnvironmentExecutor)
    assert get_backend_adapter_class("celery") is CeleryAdapter
    assert isinstance(BackendAdapterEnvironmentExecutor("celery"), BackendAdapterEnvironmentExecutor)


def test_the_wove_2x_keys_and_the_shared_keys_are_known() -> None:
    wove2 = {"app", "broker_url", "result_backend", "app_name", "task_name", "queue", "send_task_options",
             "terminate_on_cancel"}
    shared = {"callback_host", "callback_url", "require_signed_callbacks", "result_channel", "max_deliveries"}
    assert wove2 | shared <= set(CELERY_OPTIONS.options)
    assert "backend_url" in CELERY_OPTIONS  # Wove 2.x's other spelling of result_backend


def test_task_ids() -> None:
    assert celery_task_id("add:1f") == "add:1f"
    assert celery_task_id("add:1f", "report-7") == "report-7"
    assert celery_task_id("add:1f", "report-7", attempt=2) == "report-7#2"
    assert celery_task_id("add:1f", attempt=3) == "add:1f#3"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(("config", "match"), [
    ({"broker_ur": "redis://127.0.0.1:6379/1"}, r"celery executor: executor_config key 'broker_ur' \(did you mean "
                                                r"'broker_url'\?\) is not a celery executor option\. Known keys: .*app"),
    ({"terminate_on_cancle": True}, r"did you mean 'terminate_on_cancel'\?"),
    ({"broker_url": "redis://x", "send_task_options": {"task_id": "x"}}, r"send_task_options must be a dict of "
                                                                          r"app.send_task keyword arguments.*may not set 'task_id'"),
    ({"broker_url": "redis://x", "terminate_on_cancel": "yes"}, r"terminate_on_cancel must be true or false"),
    ({"broker_url": "redis://x", "terminate_signal": "SIGNOPE"}, r"terminate_signal must be a signal name"),
    ({"app": "not an app"}, r"app must be a celery.Celery application"),
    ({"broker_url": "redis://x", "result_channel": "smoke"}, r"result_channel must be one of 'auto'"),
    ({}, r"needs 'app' \(a Celery application\) or 'broker_url'"),
    ({"broker_url": "redis://x", "result_backend": "redis://y", "backend_url": "redis://z"},
     r"sets both 'result_backend' and its older spelling 'backend_url'"),
])
async def test_bad_config_fails_at_start(config: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        async with ExecutorRuntime({"c": {"executor": "celery", "executor_config": config}}, {}):
            pass


async def test_app_together_with_broker_url_is_refused() -> None:
    from celery import Celery

    app = Celery("mine", broker="memory://", set_as_current=False)
    with pytest.raises(ConfigError, match="sets 'app' together with broker_url"):
        async with ExecutorRuntime({"c": {"executor": "celery", "executor_config": {
                "app": app, "broker_url": "redis://127.0.0.1:6379/1"}}}, {}):
            pass


@pytest.mark.timeout(30)
@pytest.mark.parametrize("scheme", ["redis", "amqp"])
async def test_unreachable_broker_names_the_url_without_its_password(scheme: str) -> None:
    port = _closed_port()
    url = f"{scheme}://guest:secret@127.0.0.1:{port}/0" if scheme == "redis" else \
        f"amqp://guest:secret@127.0.0.1:{port}//"
    with pytest.raises(OSError) as info:
        async with ExecutorRuntime({"c": {"executor": "celery", "executor_config": {
                "broker_url": url, "connect_timeout": 1.0}}}, {}):
            pass
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message and "secret" not in message and "connect_timeout=1 s" in message, message


async def test_engine_result_channel_needs_a_result_backend(redis_service: tuple[str, int]) -> None:
    host, port = redis_service
    with pytest.raises(ConfigError, match="result_channel 'engine' needs a Celery result backend"):
        async with ExecutorRuntime({"c": {"executor": "celery", "executor_config": {
                "broker_url": f"redis://{host}:{port}/1", "result_channel": "engine"}}}, {}):
            pass


def test_register_wove_task_needs_a_celery_app() -> None:
    with pytest.raises(TypeError, match=r"needs a celery\.Celery application, got str"):
        register_wove_task("app")


def test_register_wove_task_adds_the_task_under_the_2x_name() -> None:
    from celery import Celery

    app = Celery("mine", broker="memory://", set_as_current=False)
    task = register_wove_task(app)
    assert task.name == "wove.run_backend_payload" and "wove.run_backend_payload" in app.tasks
    assert task.acks_late and not task.reject_on_worker_lost and task.track_started
    custom = register_wove_task(app, "myapp.wove_task", queue="wove")
    assert custom.name == "myapp.wove_task" and custom.queue == "wove"
