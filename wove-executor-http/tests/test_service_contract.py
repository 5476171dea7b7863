"""The worker-service contract kit against ``wove worker http``."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from wove.testing import WorkerProcess, WorkerServiceContract

pytestmark = pytest.mark.integration


class TestHttpService(WorkerServiceContract):
    service = "http"
    executor = "http"
    address_key = "url"

    def executor_config(self, worker: WorkerProcess) -> dict[str, Any]:
        # NDJSON streaming, so the kit's clients see task_started as it happens (a plain
        # JSON answer arrives whole, at the end of the run)
        return {"url": worker.address, "stream": True}

    async def send_raw(self, address: str, data: bytes) -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.post(address, content=data, headers={"content-type": "application/json"})
            assert response.status_code in (200, 400), response.text
