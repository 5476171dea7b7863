"""The worker-service contract kit against ``wove worker websocket``."""

from __future__ import annotations

import pytest

from wove.testing.services import WorkerServiceContract

pytestmark = pytest.mark.integration


class TestWebSocketService(WorkerServiceContract):
    service = "websocket"
    executor = "websocket"
    address_key = "url"

    async def send_raw(self, address: str, data: bytes) -> None:
        from websockets.asyncio.client import connect

        async with connect(address) as ws:
            await ws.send(data, text=True)
            await ws.send(b'{"type": "cancel_task", "run_id": "none:0", "task_id": "none"}', text=True)
