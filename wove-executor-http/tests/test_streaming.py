"""Streamed results over HTTP: NDJSON answers, credit by POST, negotiated by X-Wove-Capabilities."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from wove.environment import ExecutorRuntime
from wove.errors import StreamNotSupportedError
from wove.protocol import decode_command, encode_event
from wove.testing import tasks

pytestmark = pytest.mark.integration


@pytest.fixture
def wove2_style_worker() -> Iterator[tuple[str, Counter[str]]]:
    """A worker answering the Wove 2.x wire format with no X-Wove-Capabilities header."""
    commands: Counter[str] = Counter()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            self._answer(200, b'{"status": "ok"}')

        def do_POST(self) -> None:
            frame = decode_command(self.rfile.read(int(self.headers["Content-Length"])))
            commands[frame["type"]] += 1
            events = []
            if frame["type"] == "run_task":
                events.append(json.loads(encode_event({
                    "type": "task_result", "run_id": frame["run_id"], "task_id": frame["task_id"],
                    "result": frame["callable"](**frame["args"])})))
            self._answer(200, json.dumps({"events": events}).encode())

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/wove", commands
    server.shutdown()
    server.server_close()


async def test_a_worker_that_does_not_announce_gets_no_streamed_run(
        wove2_style_worker: tuple[str, Counter[str]]) -> None:
    url, commands = wove2_style_worker
    async with ExecutorRuntime({"w": {"executor": "http", "executor_config": {"url": url}}}) as runtime:
        with pytest.raises(StreamNotSupportedError, match="does not support streamed results"):
            await runtime.stream("w", tasks.count_up, 3, "/nonexistent").start()
        assert await runtime.call("w", tasks.add, 2, 3) == 5
        with pytest.raises(StreamNotSupportedError, match="task_yield"):  # at the first step, before sending
            async for _item in runtime.stream("w", tasks.count_up, 3, "/nonexistent"):
                pass
    assert commands == Counter({"run_task": 1}), commands  # no streamed run, no stream_credit


async def test_stream_false_never_streams(worker: Any) -> None:
    definition = {"executor": "http", "executor_config": {"url": worker.url, "stream": False}}
    async with ExecutorRuntime({"w": definition}) as runtime:
        with pytest.raises(StreamNotSupportedError):
            await runtime.stream("w", tasks.count_up, 3, "/nonexistent").start()


async def test_every_answer_and_health_announce_task_yield(worker: Any) -> None:
    async with httpx.AsyncClient() as client:
        health = await client.get(f"{worker.url}/health")
        assert "task_yield" in health.json()["capabilities"]
        assert "task_yield" in health.headers["x-wove-capabilities"].split(", ")
        credit = await client.post(worker.url, json={"type": "stream_credit", "run_id": "x:1", "task_id": "x",
                                                     "credit": 2})
        assert credit.status_code == 200 and credit.json() == {"events": []}
        assert "task_yield" in credit.headers["x-wove-capabilities"]
