"""Streamed results over stdio: negotiated through the worker's ready line."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from wove.environment import ExecutorRuntime
from wove.errors import StreamNotSupportedError
from wove.testing import tasks

pytestmark = [pytest.mark.integration]


async def test_our_worker_announces_streaming_on_its_ready_line(tmp_path: Path) -> None:
    release = tmp_path / "release"
    async with ExecutorRuntime({"w": {"executor": "stdio"}}) as runtime:
        items = runtime.stream("w", tasks.stream_until_released, str(release))
        assert items.run_id.startswith("stream_until_released:")
        async with items:
            assert await asyncio.wait_for(items.__anext__(), 30) == "first"
            release.write_text("go")
            assert [item async for item in items] == ["second"]


async def test_aclose_closes_the_generator_in_the_worker(tmp_path: Path) -> None:
    marker = tmp_path / "closed"
    async with ExecutorRuntime({"w": {"executor": "stdio"}}) as runtime:
        async with runtime.stream("w", tasks.acount_up, 1000, str(tmp_path / "n"), str(marker)) as items:
            assert await items.__anext__() == 0
        for _ in range(1000):
            if marker.exists():
                break
            await asyncio.sleep(0.01)
        assert marker.read_text() == "closed"


@pytest.mark.interop
async def test_a_wove2_worker_gets_no_streamed_run(wove2_python: Path) -> None:
    """Wove 2.0.3's stdio worker announces nothing: the call fails at once, nothing is sent."""
    config = {"command": [str(wove2_python), "-m", "wove.stdio_worker"]}
    async with ExecutorRuntime({"w": {"executor": "stdio", "executor_config": config}}) as runtime:
        with pytest.raises(StreamNotSupportedError, match="does not support streamed results") as caught:
            runtime.stream("w", tasks.count_up, 3, "/nonexistent/counter")
        assert "task_yield" in str(caught.value) and "upgrade" in str(caught.value)
        assert await runtime.call("w", lambda a, b: a + b, 2, 3) == 5  # the worker still serves plain calls
