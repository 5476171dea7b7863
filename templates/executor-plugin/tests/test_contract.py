"""The executor contract and the worker-service contract, against a real `wove worker example`."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from wove.testing import ExecutorContract, WorkerProcess
from wove.testing.services import WorkerServiceContract


@pytest.fixture(scope="module")
def worker() -> Iterator[WorkerProcess]:
    process = WorkerProcess("example")
    process.start()
    yield process
    process.stop()


class TestExampleContract(ExecutorContract):
    @pytest.fixture
    def executor_name(self) -> str:
        return "example"

    @pytest.fixture
    def executor_config(self, worker: WorkerProcess) -> dict[str, Any]:
        return {"address": worker.address}


class TestExampleService(WorkerServiceContract):
    service = "example"
    executor = "example"
    address_key = "address"

    async def send_raw(self, address: str, data: bytes) -> None:
        host, _, port = address.rpartition(":")
        _reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(data + b"\n")
        writer.write(b'{"type": "cancel_task", "run_id": "none:0", "task_id": "none"}\n')
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.close()
        await writer.wait_closed()
