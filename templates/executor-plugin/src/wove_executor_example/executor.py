"""ExampleEnvironmentExecutor: frames as JSON lines over TCP to ``wove worker example``.

A real transport replaces the connection with its own (a socket protocol, a queue, a
subprocess), and keeps the three calls into :class:`wove.transport.FrameExecutor`:
``self._track(frame)`` before a ``run_task`` goes out, ``self._emit(event)`` for each
event read back, and ``self._lost(run_id, reason)`` when the transport loses a run (the
base class re-delivers ``requeue`` runs or fails the run with a clear error).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from wove.errors import ConfigError
from wove.protocol import decode_events, encode_frame
from wove.transport import FrameExecutor

#: Longest event line read back (results can be large).
LINE_LIMIT = 256 * 1024 * 1024 + 1


class ExampleEnvironmentExecutor(FrameExecutor):
    """Sends commands to an example worker service at ``executor_config.address``."""

    executor_name = "example"

    def __init__(self) -> None:
        super().__init__()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reading: asyncio.Task[None] | None = None
        self._address = ""

    async def start(self, *, environment_name: str, environment_config: dict[str, Any],
                    run_config: dict[str, Any]) -> None:
        config = dict(environment_config)
        address = config.pop("address", None)
        host, _, port = str(address).rpartition(":")
        if not isinstance(address, str) or not host or not port.isdigit():
            raise ConfigError(f"Environment '{environment_name}': executor_config.address must be 'host:port' of a "
                              f"`wove worker example` service, got {address!r}.")
        self._open_events(environment_name, config)
        self._address = address
        try:
            self._reader, self._writer = await asyncio.open_connection(host.strip("[]"), int(port), limit=LINE_LIMIT)
        except OSError as exc:
            raise ConnectionError(f"Environment '{environment_name}': cannot connect to the example worker at "
                                  f"{address} ({exc}). Is `wove worker example --port {port}` running?") from exc
        self._reading = asyncio.get_running_loop().create_task(self._read())

    async def send(self, frame: dict[str, Any]) -> None:
        self._require_started()
        if self._writer is None or self._writer.is_closing():
            raise ConnectionError(f"The example worker at {self._address} closed the connection.")
        if frame.get("type") not in ("run_task", "cancel_task", "shutdown"):
            raise ValueError(f"example executor cannot send frame type {frame.get('type')!r}; "
                             "expected run_task, cancel_task or shutdown.")
        if frame["type"] == "run_task":
            self._track(frame)
        self._writer.write(encode_frame(frame) + b"\n")
        await self._writer.drain()

    async def _read(self) -> None:
        assert self._reader is not None
        reason = f"The example worker at {self._address} closed the connection."
        try:
            while line := await self._reader.readline():
                for event in decode_events(line):
                    self._emit(event)
        except (ConnectionError, ValueError) as exc:
            reason = f"Lost the connection to the example worker at {self._address}: {exc}."
        for run_id in list(self._inflight):
            self._lost(run_id, reason, redeliverable=False)

    async def stop(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        if self._reading is not None:
            self._reading.cancel()
            with contextlib.suppress(BaseException):
                await self._reading
        self._reader = self._writer = self._reading = None
