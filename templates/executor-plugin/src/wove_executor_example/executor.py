"""ExampleEnvironmentExecutor: frames go through the wire codec to an in-process worker engine.

A real transport replaces ``_transmit`` (write bytes to a socket, a queue, a subprocess)
and calls ``self._emit(event)`` for each event it reads back, and ``self._lost(...)`` when
the transport loses a run.
"""

from __future__ import annotations

import asyncio
from typing import Any

from wove.protocol import decode_events, encode_event, encode_frame
from wove.transport import FrameExecutor
from wove.worker import WorkerEngine


class ExampleEnvironmentExecutor(FrameExecutor):
    """Encodes every command to bytes and back, as a network transport would."""

    executor_name = "example"

    def __init__(self) -> None:
        super().__init__()
        self._engine: WorkerEngine | None = None
        self._delay = 0.0

    async def start(self, *, environment_name: str, environment_config: dict[str, Any],
                    run_config: dict[str, Any]) -> None:
        delay = environment_config.get("delay", 0)
        if not isinstance(delay, (int, float)) or delay < 0:
            raise ValueError(f"Environment '{environment_name}': executor_config.delay must be a "
                             f"non-negative number of seconds, got {delay!r}.")
        self._delay = float(delay)
        self._open_events(environment_name, environment_config)
        self._engine = WorkerEngine(name=f"example:{environment_name}")

    async def send(self, frame: dict[str, Any]) -> None:
        self._require_started()
        if frame.get("type") not in ("run_task", "cancel_task", "shutdown"):
            raise ValueError(f"example executor cannot send frame type {frame.get('type')!r}")
        if frame["type"] == "run_task":
            self._track(frame)
        await self._transmit(encode_frame(frame))

    async def _transmit(self, data: bytes) -> None:
        assert self._engine is not None
        if self._delay:
            await asyncio.sleep(self._delay)

        def sink(event: dict[str, Any]) -> None:  # the "worker side" answers with bytes
            for decoded in decode_events(encode_event(event)):
                self._emit(decoded)

        await self._engine.handle(data, sink)

    async def stop(self) -> None:
        if self._engine is not None:
            await self._engine.aclose()
            self._engine = None
