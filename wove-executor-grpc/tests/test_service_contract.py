"""The worker-service contract kit against ``wove worker grpc``."""

from __future__ import annotations

import grpc
import grpc.aio
import pytest

from wove.testing.services import WorkerServiceContract
from wove_executor_grpc.server import SEND_METHOD, SESSION_METHOD, STREAM_METHOD

pytestmark = pytest.mark.integration


class TestGrpcService(WorkerServiceContract):
    service = "grpc"
    executor = "grpc"
    address_key = "target"

    async def send_raw(self, address: str, data: bytes) -> None:
        """``data`` as one request on each method: Send, Stream, and a Session message."""
        async with grpc.aio.insecure_channel(address) as channel:
            for method in (SEND_METHOD, STREAM_METHOD):
                try:
                    if method == SEND_METHOD:
                        await channel.unary_unary(method)(data, timeout=10)
                    else:
                        _ = [message async for message in channel.unary_stream(method)(data, timeout=10)]
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, exc)
            call = channel.stream_stream(SESSION_METHOD)(timeout=10)
            await call.write(data)
            await call.done_writing()
            _ = [message async for message in call]
            assert await call.code() == grpc.StatusCode.OK
