"""wove.metrics through wove.session: what a worker service counts, without a transport.

The transports' own tests scrape real services over HTTP; these drive the one session
layer every transport shares and read the counts from the service's own registry.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest

from wove.metrics import OUTCOMES, REJECTION_REASONS, ServiceMetrics
from wove.protocol import decode_events, encode_frame
from wove.security import NetworkExecutorSecurity
from wove.session import Rejected, WorkerService, WorkerSession
from wove.testing import tasks

SECRET = "metrics test secret"


def _command(func: Any, args: dict[str, Any], run_id: str, **delivery: Any) -> bytes:
    return encode_frame({"type": "run_task", "run_id": run_id, "task_id": run_id.split(":")[0],
                         "callable": func, "args": args, "delivery": delivery})


def _value(worker: WorkerService, name: str, **labels: str) -> float:
    assert worker.metrics is not None
    value = worker.metrics.registry.get_sample_value(name, labels)
    assert value is not None, f"no sample {name} {labels}"
    return float(value)


async def _terminals(session: WorkerSession, count: int, timeout: float = 10.0) -> dict[str, str]:
    """run_id -> terminal event type, for the next ``count`` terminal events."""
    seen: dict[str, str] = {}

    async def wait() -> None:
        while len(seen) < count:
            await session.wait()
            for data in session.data_to_send("envelope"):
                for event in decode_events(data):
                    if event["type"] in ("task_result", "task_error", "task_cancelled"):
                        seen[event["run_id"]] = event["type"]

    await asyncio.wait_for(wait(), timeout)
    return seen


def test_importing_wove_imports_no_prometheus_client() -> None:
    code = textwrap.dedent("""
        import sys
        import wove, wove.environment, wove.session, wove.metrics, wove.serve, wove.cli
        from wove.session import WorkerService
        WorkerService(name="plain")
        assert "prometheus_client" not in sys.modules, "imported prometheus_client"
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_metrics_without_prometheus_client_say_how_to_install_it() -> None:
    code = textwrap.dedent("""
        import sys
        sys.modules["prometheus_client"] = None  # as if it were not installed
        from wove.session import WorkerService
        try:
            WorkerService(metrics=True)
        except ImportError as exc:
            print(exc)
        from wove.cli import main
        sys.exit(main(["worker", "http", "--metrics-port", "0"]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert 'pip install "wove-core[metrics]"' in out.stdout
    assert out.returncode == 2, out.stderr
    assert 'pip install "wove-core[metrics]"' in out.stderr and "listening on" not in out.stdout


async def test_runs_are_counted_by_outcome_with_their_execution_time() -> None:
    service = WorkerService(name="counted", metrics=True)
    session = service.session("client")
    await session.receive(_command(tasks.add, {"a": 1, "b": 2}, "add:1"))
    await session.receive(_command(tasks.add, {"a": 3, "b": 4}, "add:2"))
    await session.receive(_command(tasks.fail, {"message": "boom"}, "fail:1"))
    await session.receive(_command(tasks.sleep, {"seconds": 30}, "sleep:1"))
    await asyncio.sleep(0.05)
    assert _value(service, "wove_worker_runs_in_flight") >= 1
    await session.receive(json.dumps({"type": "cancel_task", "run_id": "sleep:1", "task_id": "sleep"}))
    ended = await _terminals(session, 4)
    assert ended == {"add:1": "task_result", "add:2": "task_result", "fail:1": "task_error",
                     "sleep:1": "task_cancelled"}
    assert _value(service, "wove_worker_runs_accepted_total") == 4
    assert _value(service, "wove_worker_runs_completed_total", outcome="result") == 2
    assert _value(service, "wove_worker_runs_completed_total", outcome="error") == 1
    assert _value(service, "wove_worker_runs_completed_total", outcome="cancelled") == 1
    assert _value(service, "wove_worker_run_duration_seconds_count", outcome="result") == 2
    assert _value(service, "wove_worker_run_duration_seconds_count", outcome="cancelled") == 1
    assert _value(service, "wove_worker_run_duration_seconds_sum", outcome="cancelled") > 0
    assert _value(service, "wove_worker_runs_in_flight") == 0
    assert _value(service, "wove_worker_sessions_open") == 1
    session.connection_lost()
    assert _value(service, "wove_worker_sessions_open") == 0
    assert _value(service, "wove_worker_sessions_total") == 1
    assert _value(service, "wove_worker_info", service="counted", version=_version()) == 1
    await service.drain(1.0)


def _version() -> str:
    from importlib import metadata

    return metadata.version("wove-core")


async def test_runs_without_a_terminal_event_count_as_detached_or_requeued() -> None:
    service = WorkerService(name="kept", metrics=True)
    first = service.session("leaves")
    await first.receive(_command(tasks.sleep, {"seconds": 0.2}, "sleep:kept", delivery_orphan_policy="detach"))
    await asyncio.sleep(0.05)
    first.connection_lost()  # the run keeps going for a re-delivery
    assert _value(service, "wove_worker_runs_completed_total", outcome="detached") == 1
    second = service.session("stays")
    await second.receive(_command(tasks.sleep, {"seconds": 30}, "sleep:requeue", delivery_orphan_policy="requeue"))
    await asyncio.sleep(0.05)
    await service.drain(0.1)  # ends it silently: its client delivers it elsewhere
    second.connection_lost()
    assert _value(service, "wove_worker_runs_completed_total", outcome="requeued") == 1
    assert _value(service, "wove_worker_runs_accepted_total") == 2
    assert sum(_value(service, "wove_worker_runs_completed_total", outcome=o) for o in OUTCOMES) == 2


def _signed(security: NetworkExecutorSecurity, body: bytes, **override: str) -> dict[str, str]:
    headers = security.headers_for(transport="http", target="/wove", body=body)
    headers.update(override)
    return {k.lower(): v for k, v in headers.items()}


def _refuse(service: WorkerService, headers: dict[str, str], body: bytes) -> str:
    with pytest.raises(Rejected) as caught:
        service.authenticate(headers, transport="http", target="/wove", body=body)
    return caught.value.reason


async def test_refusals_are_counted_by_reason() -> None:
    client = NetworkExecutorSecurity.from_config({"type": "signed", "secret": SECRET})
    service = WorkerService(name="guarded", security={"type": "signed", "secret": SECRET}, metrics=True,
                            max_command_bytes=10_000, max_runs_per_session=1)
    body = b'{"type": "shutdown"}'
    assert _refuse(service, {}, body) == "unauthenticated"
    assert _refuse(service, _signed(client, body, **{"X-Wove-Signature": "v1=" + "0" * 64}), body) == "permission_denied"
    old = str(int(time.time()) - 3600)
    assert _refuse(service, _signed(client, body, **{"X-Wove-Timestamp": old}), body) == "permission_denied"
    good = _signed(client, body)
    service.authenticate(good, transport="http", target="/wove", body=body)
    assert _refuse(service, good, body) == "permission_denied"  # the same nonce again
    assert _refuse(service, _signed(client, b"x" * 20_000), b"x" * 20_000) == "too_large"
    session = service.session("client")
    await session.receive(b"not json")
    with pytest.raises(Rejected):
        await session.receive(b"[1, 2]", strict=True)
    await session.receive(_command(tasks.sleep, {"seconds": 0.5}, "sleep:1"))
    await session.receive(_command(tasks.sleep, {"seconds": 30}, "sleep:2"))  # over max_runs_per_session
    drain = asyncio.ensure_future(service.drain(10.0))  # waits for sleep:1
    await asyncio.sleep(0.05)
    assert not service.ready and not session.ended
    await service.session("late").receive(_command(tasks.add, {"a": 1, "b": 1}, "add:late"))
    await drain
    expected = {"unauthenticated": 1, "bad_credentials": 1, "expired": 1, "replay": 1, "too_large": 1,
                "bad_frame": 2, "capacity": 1, "draining": 1, "timeout": 0}
    assert set(expected) == set(REJECTION_REASONS)
    assert {r: _value(service, "wove_worker_rejected_total", reason=r) for r in REJECTION_REASONS} == expected
    assert _value(service, "wove_worker_runs_accepted_total") == 1  # neither refused run was accepted
    with pytest.raises(ValueError, match="Unknown rejection reason 'oops'"):
        service.record_rejection("oops")


async def test_readiness_follows_the_drain_and_closing_callbacks_run_first() -> None:
    service = WorkerService(name="probe", metrics=True)
    seen: list[tuple[bool, float]] = []

    async def closing() -> None:
        seen.append((service.ready, _value(service, "wove_worker_ready")))

    service.add_closing_callback(closing)
    assert service.ready and _value(service, "wove_worker_ready") == 1
    await service.drain(0.0)
    assert seen == [(False, 0.0)]
    assert not service.ready and _value(service, "wove_worker_ready") == 0


def test_each_service_counts_in_its_own_registry() -> None:
    one = WorkerService(name="one", metrics=True)
    two = WorkerService(name="two", metrics=True)
    assert one.metrics is not None and two.metrics is not None
    assert one.metrics.registry is not two.metrics.registry
    one.record_rejection("bad_frame")
    assert _value(one, "wove_worker_rejected_total", reason="bad_frame") == 1
    assert _value(two, "wove_worker_rejected_total", reason="bad_frame") == 0
    assert one.enable_metrics() is one.metrics
    with pytest.raises(ValueError, match="already counts"):
        one.enable_metrics(ServiceMetrics("other"))
    with pytest.raises(ValueError, match="already belong"):
        two.metrics.bind(one)
    shared = ServiceMetrics("first")
    with pytest.raises(ValueError, match="already holds"):
        ServiceMetrics("second", registry=shared.registry)


@pytest.mark.parametrize(("args", "expected"), [
    (["--metrics-host", "0.0.0.0"], "--metrics-host '0.0.0.0' needs --metrics-port PORT"),
    (["--port", "9999", "--metrics-port", "9999"], "--metrics-port 9999 is also the service's --port"),
])
def test_metrics_flags_are_checked_before_serving(args: list[str], expected: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from wove.cli import main

    assert main(["worker", "http", *args]) == 2
    out = capsys.readouterr()
    assert expected in out.err and "listening on" not in out.out
