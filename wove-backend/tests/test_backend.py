"""wove.backend: payloads, worker entry points, the callback server and the adapter executor."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import httpx
import pytest

from wove.backend import (
    BackendAdapter,
    BackendAdapterEnvironmentExecutor,
    BackendCallbackServer,
    CallbackConnectionPool,
    build_backend_payload,
    payload_from_b64,
    payload_to_b64,
    post_event,
    post_events,
    run_backend_payload,
)
from wove.environment import EnvironmentExecutionError, ExecutorRuntime
from wove.protocol import TERMINAL_EVENTS, encode_event, unpack_frame
from wove.testing import tasks

pytestmark = pytest.mark.timeout(60)


def _frame(func: Any, args: dict[str, Any], run_id: str = "t:1", **delivery: Any) -> dict[str, Any]:
    return {"type": "run_task", "run_id": run_id, "task_id": run_id.split(":")[0], "callable": func,
            "args": args, "delivery": delivery}


async def _until_terminal(server: BackendCallbackServer, timeout: float = 10.0) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    while not events or events[-1]["type"] not in TERMINAL_EVENTS:
        events.append(await asyncio.wait_for(server.recv(), timeout))
    return events


@pytest.fixture
async def server() -> Any:
    srv = BackendCallbackServer(max_body_bytes=4096)
    await srv.start()
    yield srv
    await srv.stop()


# -- payloads ----------------------------------------------------------------------------
def test_import_is_light() -> None:
    code = ("import sys, wove.backend, wove.environment; "
            "print(sorted(m for m in ('uvicorn','httpx','cloudpickle','distributed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_environment_exports_the_executor() -> None:
    from wove.environment import BackendAdapterEnvironmentExecutor as exported

    assert exported is BackendAdapterEnvironmentExecutor


def test_payload_shape_and_round_trip() -> None:
    payload = build_backend_payload(_frame(tasks.add, {"a": 1, "b": 2}, delivery_timeout=5.0),
                                    callback_url="http://127.0.0.1:1/wove/events/x", adapter="test")
    assert set(payload) == {"version", "adapter", "callback_url", "run_id", "task_id", "task_name",
                            "callable_pickle", "args_pickle", "delivery", "callback_key", "result_channel"}
    assert payload["version"] == 1 and payload["delivery"] == {"delivery_timeout": 5.0}
    other = build_backend_payload(_frame(tasks.add, {"a": 1, "b": 2}), callback_url="http://x", adapter="test")
    assert len(payload["callback_key"]) == 64 and other["callback_key"] != payload["callback_key"]  # per run
    assert payload_from_b64(payload_to_b64(payload)) == payload
    json.dumps(payload)  # JSON-safe
    decoded = unpack_frame({"callable_pickle": payload["callable_pickle"], "args_pickle": payload["args_pickle"]})
    assert decoded["callable"](**decoded["args"]) == 3


def test_payload_from_b64_rejects_non_objects() -> None:
    with pytest.raises(ValueError, match="JSON object"):
        payload_from_b64(payload_to_b64([1, 2]))  # type: ignore[arg-type]


def test_unpicklable_args_name_the_task() -> None:
    import threading

    from wove.errors import DispatchError

    with pytest.raises(DispatchError, match="t"):
        build_backend_payload(_frame(tasks.echo, {"value": threading.Lock()}), callback_url="http://x", adapter="a")


# -- callback server ---------------------------------------------------------------------
async def test_callback_server_accepts_the_token_path(server: BackendCallbackServer) -> None:
    assert server.callback_url is not None and server.token in server.callback_url
    body = encode_event({"type": "task_result", "run_id": "t:1", "task_id": "t", "result": {"x": [1, 2]}})
    async with httpx.AsyncClient() as client:
        response = await client.post(server.callback_url, content=body)
    assert response.status_code == 204
    event = await asyncio.wait_for(server.recv(), 5)
    assert event["type"] == "task_result" and event["result"] == {"x": [1, 2]}


async def test_callback_server_rejects_everything_else(server: BackendCallbackServer) -> None:
    assert server.callback_url is not None
    base = server.callback_url.rsplit("/wove/events/", 1)[0]
    body = encode_event({"type": "task_result", "run_id": "t:1", "task_id": "t", "result": 1})
    async with httpx.AsyncClient() as client:
        assert (await client.post(f"{base}/wove/events/{'x' * 43}", content=body)).status_code == 403
        assert (await client.post(f"{base}/wove/events/", content=body)).status_code == 403
        assert (await client.post(f"{base}/wove/events/{server.token}/extra", content=body)).status_code == 403
        assert (await client.post(f"{base}/", content=body)).status_code == 404
        assert (await client.post(f"{base}/other/{server.token}", content=body)).status_code == 404
        assert (await client.get(server.callback_url)).status_code == 405
        assert (await client.post(server.callback_url, content=b"x" * 5000)).status_code == 413

        async def chunks() -> Any:  # no Content-Length: the limit still applies while reading
            for _ in range(5):
                yield b"y" * 1000

        assert (await client.post(server.callback_url, content=chunks())).status_code == 413
        bad = await client.post(server.callback_url, content=b'{"type": "task_result"}')
        assert bad.status_code == 400 and "run_id" in bad.text
        assert (await client.post(server.callback_url, content=b"not json")).status_code == 400
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(server.recv(), 0.3)  # nothing was queued


async def test_callback_server_public_url_and_token() -> None:
    srv = BackendCallbackServer(public_url="http://gateway.example:9000/", token="a" * 20)
    await srv.start()
    try:
        assert srv.callback_url == "http://gateway.example:9000/wove/events/" + "a" * 20
    finally:
        await srv.stop()
    with pytest.raises(ValueError, match="16 characters"):
        BackendCallbackServer(token="short")


async def test_callback_server_port_in_use_is_a_clear_error(server: BackendCallbackServer) -> None:
    other = BackendCallbackServer(port=server.bound_port or 0)
    with pytest.raises(OSError, match="callback_port"):
        await other.start()


# -- worker entry points -----------------------------------------------------------------
async def test_run_backend_payload_posts_started_and_result(server: BackendCallbackServer) -> None:
    assert server.callback_url is not None
    payload = build_backend_payload(_frame(tasks.add, {"a": 2, "b": 5}), callback_url=server.callback_url,
                                    adapter="test")
    assert await asyncio.to_thread(run_backend_payload, payload) == 7
    events = await _until_terminal(server)
    # a quick run posts only its terminal event; a longer one posts task_started first
    assert [e["type"] for e in events] in (["task_result"], ["task_started", "task_result"])
    assert events[-1]["result"] == 7 and events[-1]["run_id"] == "t:1"
    slow = build_backend_payload(_frame(tasks.blocking_sleep, {"seconds": 0.3}, run_id="s:1"),
                                 callback_url=server.callback_url, adapter="test")
    assert await asyncio.to_thread(run_backend_payload, slow) == 0.3
    assert [e["type"] for e in await _until_terminal(server)] == ["task_started", "task_result"]


async def test_run_backend_payload_task_error_and_heartbeats(server: BackendCallbackServer) -> None:
    assert server.callback_url is not None

    def slow_fail() -> None:
        import time

        time.sleep(0.5)
        raise tasks.ContractTaskError("nope")

    payload = build_backend_payload(_frame(slow_fail, {}, delivery_heartbeat_seconds=0.3),
                                    callback_url=server.callback_url, adapter="test")
    outcome = await asyncio.to_thread(run_backend_payload, payload)
    assert outcome["type"] == "task_error"
    events = await _until_terminal(server)
    kinds = [e["type"] for e in events]
    assert kinds[0] == "task_started" and kinds[-1] == "task_error" and "heartbeat" in kinds
    error = events[-1]
    assert isinstance(error["exception"], tasks.ContractTaskError)
    assert error["error"]["source"] == "task" and error["error"]["kind"] == "ContractTaskError"


async def test_run_backend_payload_refuses_a_running_loop() -> None:
    with pytest.raises(RuntimeError, match="run_backend_payload_async"):
        run_backend_payload({"callback_url": "http://x", "run_id": "a:1", "task_id": "a"})


def test_post_event_to_a_dead_server_raises_oserror() -> None:
    with pytest.raises(OSError):
        post_event("http://127.0.0.1:9/wove/events/x", {"type": "heartbeat", "run_id": "a:1", "task_id": "a"},
                   timeout=2)


# -- keep-alive callback connections -----------------------------------------------------
def _event(run_id: str = "k:1", **fields: Any) -> dict[str, Any]:
    return {"type": "task_result", "run_id": run_id, "task_id": run_id.split(":")[0], "result": 1, **fields}


async def test_pool_reuses_one_connection(server: BackendCallbackServer) -> None:
    url = server.callback_url
    assert url is not None
    pool = CallbackConnectionPool()
    try:
        for i in range(5):
            await asyncio.to_thread(pool.post, url, encode_event(_event(f"k:{i}", result=i)), 5.0)
        assert [(await asyncio.wait_for(server.recv(), 5))["result"] for _ in range(5)] == [0, 1, 2, 3, 4]
        assert pool.opened == 1
    finally:
        pool.close()


async def test_pool_reconnects_after_the_server_restarts(server: BackendCallbackServer) -> None:
    url, port, token = server.callback_url, server.bound_port, server.token
    assert url is not None and port is not None
    pool = CallbackConnectionPool()
    try:
        await asyncio.to_thread(pool.post, url, encode_event(_event("k:1")), 5.0)
        assert (await asyncio.wait_for(server.recv(), 5))["run_id"] == "k:1"
        await server.stop()  # closes the idle keep-alive connection the pool holds
        with pytest.raises(OSError):
            await asyncio.to_thread(pool.post, url, encode_event(_event("k:2")), 5.0)
        restarted = BackendCallbackServer(port=port, token=token)
        await restarted.start()
        try:
            await asyncio.to_thread(pool.post, url, encode_event(_event("k:3")), 5.0)
            assert (await asyncio.wait_for(restarted.recv(), 5))["run_id"] == "k:3"
        finally:
            await restarted.stop()
        assert pool.opened >= 2
    finally:
        pool.close()


def test_pool_retries_a_connection_the_server_closed_while_idle() -> None:
    """A server that drops a keep-alive connection after answering (without saying so):
    the next POST fails on the stale connection first and is sent again on a fresh one."""
    import http.server
    import threading

    bodies: list[bytes] = []

    class AnswerThenDrop(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive unless told otherwise

        def do_POST(self) -> None:
            bodies.append(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
            self.close_connection = True  # closes the socket, but the answer promised keep-alive

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), AnswerThenDrop)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    pool = CallbackConnectionPool()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/wove/events/" + "t" * 20
    try:
        pool.post(url, encode_event(_event("k:1")), 5.0)
        pool.post(url, encode_event(_event("k:2")), 5.0)
        assert [json.loads(body)["run_id"] for body in bodies] == ["k:1", "k:2"]
        assert pool.opened == 2
    finally:
        pool.close()
        httpd.shutdown()
        httpd.server_close()


async def test_pool_raises_http_errors_without_the_token(server: BackendCallbackServer) -> None:
    url = server.callback_url
    assert url is not None
    pool = CallbackConnectionPool()
    try:
        with pytest.raises(urllib.error.HTTPError) as info:
            await asyncio.to_thread(pool.post, url.rsplit("/", 1)[0] + "/" + "x" * 43, b"{}", 5.0)
        assert info.value.code == 403 and "x" * 43 not in str(info.value.filename)
        with pytest.raises(urllib.error.HTTPError) as bad:
            await asyncio.to_thread(pool.post, url, b"not json", 5.0)
        assert bad.value.code == 400
        await asyncio.to_thread(pool.post, url, encode_event(_event()), 5.0)  # the connection still works
        assert (await asyncio.wait_for(server.recv(), 5))["run_id"] == "k:1"
    finally:
        pool.close()


async def test_post_events_sends_a_list_in_one_request(server: BackendCallbackServer) -> None:
    assert server.callback_url is not None
    frames = [{"type": "task_started", "run_id": "k:1", "task_id": "k"}, _event("k:1", result={"a": 1})]
    await asyncio.to_thread(post_events, server.callback_url, frames)
    assert [e["type"] for e in await _until_terminal(server)] == ["task_started", "task_result"]


async def test_urllib_post_like_wove_2_workers_still_works(server: BackendCallbackServer) -> None:
    """Wove 2.0.3 workers POST each event with urllib on a new connection."""
    assert server.callback_url is not None

    def post() -> int:
        request = urllib.request.Request(server.callback_url or "", data=encode_event(_event(result=[1])),
                                         method="POST", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as response:
            response.read()
            return int(response.status)

    assert await asyncio.to_thread(post) == 204
    assert (await asyncio.wait_for(server.recv(), 5))["result"] == [1]


def test_pool_goes_through_urllib_when_a_proxy_is_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    pool = CallbackConnectionPool()
    with pytest.raises(urllib.error.URLError):
        pool.post("http://callback.invalid:8000/wove/events/" + "t" * 20, b"{}", 2.0)
    assert pool.opened == 0  # urllib (and its proxy) carried the request, not the pool


# -- the executor with an in-test adapter -------------------------------------------------
class ThreadAdapter(BackendAdapter):
    """Runs each payload in a thread of this process; the first ``lose`` submissions are 'lost'."""

    instances: list[ThreadAdapter] = []

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.submitted: list[dict[str, Any]] = []
        self.cancelled: list[str] = []
        self.lose = int(self.config.get("lose", 0))
        ThreadAdapter.instances.append(self)

    async def submit(self, payload: dict[str, Any], frame: dict[str, Any]) -> Any:
        self.submitted.append(payload)
        if self.lose > 0:
            self.lose -= 1
            asyncio.get_running_loop().call_later(0.05, self.report_lost, payload["run_id"], "engine lost it")
            return None
        return asyncio.get_running_loop().run_in_executor(None, run_backend_payload, payload)

    async def cancel(self, run_id: str, submission: Any, frame: dict[str, Any]) -> None:
        self.cancelled.append(run_id)


def _runtime(**config: Any) -> ExecutorRuntime:
    executor = BackendAdapterEnvironmentExecutor("thread", ThreadAdapter)
    return ExecutorRuntime({"b": {"executor": executor, "executor_config": config}}, {})


async def test_executor_results_and_task_errors() -> None:
    async with _runtime() as runtime:
        assert await runtime.call("b", tasks.add, 20, 22) == 42
        with pytest.raises(tasks.ContractTaskError, match="own error"):
            await runtime.call("b", tasks.fail, "own error")
        assert await asyncio.gather(*(runtime.call("b", tasks.add, i, 1) for i in range(30))) == [
            i + 1 for i in range(30)
        ]


async def test_lost_run_ends_with_a_transport_error() -> None:
    async with _runtime(lose=1) as runtime:
        with pytest.raises(EnvironmentExecutionError, match="engine lost it") as info:
            await runtime.call("b", tasks.add, 1, 1)
        assert info.value.payload["source"] == "transport"


async def test_lost_run_is_requeued_with_policy_requeue() -> None:
    ThreadAdapter.instances.clear()
    async with _runtime(lose=1) as runtime:
        result = await runtime.call_with("b", tasks.add, (1, 2), delivery_orphan_policy="requeue")
        assert result == 3
    submitted = ThreadAdapter.instances[-1].submitted
    assert len(submitted) == 2 and submitted[1]["attempt"] == 2 and submitted[0]["run_id"] == submitted[1]["run_id"]


async def test_requeue_is_bounded() -> None:
    async with _runtime(lose=10, max_deliveries=2) as runtime:
        with pytest.raises(EnvironmentExecutionError, match="Gave up after 2 deliveries"):
            await runtime.call_with("b", tasks.add, (1, 2), delivery_orphan_policy="requeue")


async def test_cancel_reports_task_cancelled_once() -> None:
    ThreadAdapter.instances.clear()
    executor = BackendAdapterEnvironmentExecutor("thread", ThreadAdapter)
    await executor.start(environment_name="b", environment_config={}, run_config={})
    try:
        frame = _frame(tasks.blocking_sleep, {"seconds": 0.5}, run_id="blocking_sleep:1")
        await executor.send(frame)
        await executor.send({"type": "cancel_task", "run_id": frame["run_id"], "task_id": frame["task_id"]})
        events = []
        try:
            while True:
                events.append(await asyncio.wait_for(executor.recv(), 1.5))
        except asyncio.TimeoutError:
            pass
        assert [e["type"] for e in events if e["type"] in TERMINAL_EVENTS] == ["task_cancelled"]
        assert ThreadAdapter.instances[-1].cancelled == [frame["run_id"]]
        with pytest.raises(ValueError, match="unknown command type"):
            await executor.send({"type": "bogus"})
    finally:
        await executor.stop()


async def test_missing_module_names_it_and_the_install_command() -> None:
    class NeedsEngine(BackendAdapter):
        required_modules = ("wove_no_such_engine_module",)
        install_hint = "wove-executor-nosuch"

    executor = BackendAdapterEnvironmentExecutor("nosuch", NeedsEngine)
    with pytest.raises(RuntimeError, match=r"wove_no_such_engine_module.*pip install wove-executor-nosuch"):
        await executor.start(environment_name="e", environment_config={}, run_config={})


async def test_unknown_adapter_name_is_a_value_error() -> None:
    executor = BackendAdapterEnvironmentExecutor("no-such-backend-xyz")
    with pytest.raises(ValueError, match="no-such-backend-xyz"):
        await executor.start(environment_name="e", environment_config={}, run_config={})


# -- interop with Wove 2.0.3 workers -----------------------------------------------------
async def test_wove2_worker_runs_our_payload_and_posts_to_our_server(
    server: BackendCallbackServer, wove2_python: Path, tmp_path: Path
) -> None:
    assert server.callback_url is not None
    server.max_body_bytes = 1 << 20
    factor = 3
    ok = build_backend_payload(_frame(lambda x: x * factor, {"x": 14}, run_id="mul:1"),
                               callback_url=server.callback_url, adapter="dask")
    bad = build_backend_payload(_frame(lambda: 1 / 0, {}, run_id="div:1"),
                                callback_url=server.callback_url, adapter="dask")
    (tmp_path / "payloads.json").write_text(json.dumps([ok, bad]))
    script = textwrap.dedent("""
        import json, sys
        from wove.integrations.worker import run
        for payload in json.load(open(sys.argv[1])):
            print(repr(run(payload)))
    """)
    proc = await asyncio.create_subprocess_exec(str(wove2_python), "-c", script, str(tmp_path / "payloads.json"),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, stderr.decode()
    first = await _until_terminal(server)
    second = await _until_terminal(server)
    assert [e["type"] for e in first] == ["task_started", "task_result"] and first[-1]["result"] == 42
    assert [e["type"] for e in second] == ["task_started", "task_error"]
    assert isinstance(second[-1]["exception"], ZeroDivisionError)
    assert second[-1]["error"]["kind"] == "ZeroDivisionError" and second[-1]["error"]["source"] == "task"


# -- callbacks for runs that are not pending are never decoded ---------------------------
class _TouchOnLoad:
    """Unpickling this creates ``path`` (through a public function): a visible side effect."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (Path.touch, (self.path,))


def _pickled_b64(value: Any) -> str:
    import base64
    import pickle

    return base64.b64encode(pickle.dumps(value)).decode("ascii")


class IdleAdapter(BackendAdapter):
    """Accepts submissions and never runs them (the test posts the callbacks itself)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.payloads: list[dict[str, Any]] = []

    async def submit(self, payload: dict[str, Any], frame: dict[str, Any]) -> Any:
        self.payloads.append(payload)
        return None


async def _started_idle_executor() -> BackendAdapterEnvironmentExecutor:
    executor = BackendAdapterEnvironmentExecutor("idle", IdleAdapter)
    await executor.start(environment_name="b", environment_config={}, run_config={})
    return executor


async def test_callback_for_an_unknown_run_is_refused_without_unpickling(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    marker = tmp_path / "unpickled"
    caplog.set_level("WARNING", logger="wove.backend")
    executor = await _started_idle_executor()
    try:
        assert executor.adapter is not None
        url = executor.adapter.callback_url  # the right token
        evil = {"type": "task_result", "run_id": "nope:0123456789abcdef", "task_id": "nope",
                "result_pickle": _pickled_b64(_TouchOnLoad(marker))}
        async with httpx.AsyncClient() as client:
            single = await client.post(url, content=json.dumps(evil))
            listed = await client.post(url, content=json.dumps([evil]))
            wrapped = await client.post(url, content=json.dumps({"events": [dict(evil, type="task_error",
                                                                                  error_pickle=evil["result_pickle"])]}))
        assert (single.status_code, listed.status_code, wrapped.status_code) == (404, 404, 404)
        assert "nope:0123456789abcdef" in single.text
        assert not marker.exists(), "the callback server unpickled a body for a run that does not exist"
        assert any("nope:0123456789abcdef" in record.getMessage() and "404" in record.getMessage()
                   for record in caplog.records), "the refusal was not logged"
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(executor.recv(), 0.3)  # nothing reached the runtime
    finally:
        await executor.stop()


async def test_callback_mixing_a_pending_and_an_unknown_run_decodes_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    executor = await _started_idle_executor()
    try:
        assert executor.adapter is not None
        frame = _frame(tasks.add, {"a": 1, "b": 2}, run_id="add:1")
        await executor.send(frame)
        pending = {"type": "task_result", "run_id": "add:1", "task_id": "add",
                   "result_pickle": _pickled_b64(_TouchOnLoad(marker))}
        unknown = dict(pending, run_id="add:2")
        async with httpx.AsyncClient() as client:
            response = await client.post(executor.adapter.callback_url, content=json.dumps([pending, unknown]))
        assert response.status_code == 404 and "add:2" in response.text
        assert not marker.exists()
    finally:
        await executor.stop()


async def test_signed_callbacks_are_verified_before_anything_is_decoded(tmp_path: Path) -> None:
    from wove.backend import callback_headers

    marker = tmp_path / "unpickled"
    executor = await _started_idle_executor()
    try:
        adapter = executor.adapter
        assert isinstance(adapter, IdleAdapter)
        url = adapter.callback_url
        for run_id in ("add:1", "add:2"):
            await executor.send(_frame(tasks.add, {"a": 1, "b": 2}, run_id=run_id))
        key_1, key_2 = (payload["callback_key"] for payload in adapter.payloads)
        evil = json.dumps({"type": "task_result", "run_id": "add:1", "task_id": "add",
                           "result_pickle": _pickled_b64(_TouchOnLoad(marker))}).encode()
        async with httpx.AsyncClient() as client:
            wrong_key = await client.post(url, content=evil, headers=callback_headers(key_2, "add:1", evil))
            # run 2's key signs a body that carries run 1's event
            cross_run = await client.post(url, content=evil, headers=callback_headers(key_2, "add:2", evil))
            unknown = await client.post(url, content=evil, headers=callback_headers(key_1, "add:9", evil))
            half = await client.post(url, content=evil,
                                     headers={"X-Wove-Run-Id": "add:1"})  # no signature header
        assert (wrong_key.status_code, cross_run.status_code, unknown.status_code, half.status_code) == (
            403, 403, 404, 400)
        assert "does not match" in wrong_key.text and "add:1" in cross_run.text and "add:9" in unknown.text
        assert not marker.exists()
        good = encode_event({"type": "task_result", "run_id": "add:1", "task_id": "add", "result": 3})
        async with httpx.AsyncClient() as client:
            accepted = await client.post(url, content=good, headers=callback_headers(key_1, "add:1", good))
        assert accepted.status_code == 204
        event = await asyncio.wait_for(executor.recv(), 5)
        assert event["run_id"] == "add:1" and event["result"] == 3
    finally:
        await executor.stop()


async def test_require_signed_callbacks_refuses_unsigned_ones_and_our_workers_sign() -> None:
    async with _runtime(require_signed_callbacks=True) as runtime:
        assert await runtime.call("b", tasks.add, 20, 22) == 42  # run_backend_payload signs its callbacks
        with pytest.raises(tasks.ContractTaskError):
            await runtime.call("b", tasks.fail, "signed error")
    executor = BackendAdapterEnvironmentExecutor("idle", IdleAdapter)
    await executor.start(environment_name="b", environment_config={"require_signed_callbacks": True},
                         run_config={})
    try:
        assert executor.adapter is not None
        await executor.send(_frame(tasks.add, {"a": 1, "b": 2}, run_id="add:1"))
        body = encode_event({"type": "task_result", "run_id": "add:1", "task_id": "add", "result": 3})
        async with httpx.AsyncClient() as client:
            unsigned = await client.post(executor.adapter.callback_url, content=body)
        assert unsigned.status_code == 403 and "require_signed_callbacks" in unsigned.text
    finally:
        await executor.stop()
    with pytest.raises(ValueError, match="require_signed_callbacks must be true or false, got 'yes'"):
        await BackendAdapterEnvironmentExecutor("idle", IdleAdapter).start(
            environment_name="b", environment_config={"require_signed_callbacks": "yes"}, run_config={})


async def test_a_refused_terminal_callback_is_not_retried() -> None:
    """A 4xx is the server's final word: the worker does not spend its slot posting again."""
    import http.server
    import threading

    from wove.backend import execute_backend_payload

    posts: list[str] = []

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            posts.append(self.headers.get("X-Wove-Run-Id", ""))
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/wove/events/" + "t" * 20
        payload = build_backend_payload(_frame(tasks.add, {"a": 1, "b": 1}, run_id="add:7"), callback_url=url,
                                        adapter="test")
        event, posted = await execute_backend_payload(payload)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert event["type"] == "task_result" and posted is False
    assert posts == ["add%3A7"]  # one signed attempt, no retries


class Wove2ProcessAdapter(BackendAdapter):
    """Runs each payload with Wove 2.0.3's worker entry point in a subprocess (it does not sign)."""

    python: Path | None = None

    async def submit(self, payload: dict[str, Any], frame: dict[str, Any]) -> Any:
        assert self.python is not None
        script = "import json, sys; from wove.integrations.worker import run; run(json.loads(sys.stdin.read()))"
        proc = await asyncio.create_subprocess_exec(str(self.python), "-c", script, stdin=asyncio.subprocess.PIPE,
                                                    stdout=asyncio.subprocess.DEVNULL)
        return asyncio.ensure_future(proc.communicate(json.dumps(payload).encode()))


async def test_wove2_worker_callbacks_reach_the_executor_for_pending_runs(wove2_python: Path) -> None:
    """With require_signed_callbacks false, unsigned 2.x callbacks are accepted for a pending run
    (the executor gates on the run, not the key)."""
    Wove2ProcessAdapter.python = wove2_python
    executor = BackendAdapterEnvironmentExecutor("wove2", Wove2ProcessAdapter)
    runtime = ExecutorRuntime({"b": {"executor": executor,
                                     "executor_config": {"require_signed_callbacks": False}}}, {})
    async with runtime:
        offset = 40
        assert await asyncio.wait_for(runtime.call("b", lambda x: x + offset, 2), 60) == 42  # by value
        with pytest.raises(ZeroDivisionError):
            await asyncio.wait_for(runtime.call("b", lambda: 1 / 0), 60)
