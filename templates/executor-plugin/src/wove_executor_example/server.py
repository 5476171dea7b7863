"""The example worker service: JSON lines over TCP, a thin I/O shell over wove's worker session.

Everything the protocol asks of a worker (decoding, limits, what a closed connection
means for its runs, ``shutdown`` commands, slow readers, the drain) is
:class:`wove.session.WorkerService`'s; this module only moves bytes:

* one command per line in, events as lines out, on one TCP connection;
* a connection that closes hands its runs to the session's disconnect rule;
* :meth:`ExampleWorkerServer.stop` drains: runs finish within the grace period, the rest
  end with a terminal event, then connections close.

This transport carries no headers, so it cannot authenticate clients: serve it on
loopback only (``wove worker example`` refuses ``--security``).
"""

from __future__ import annotations

import argparse
import asyncio

from wove.session import DEFAULT_MAX_COMMAND_BYTES, WorkerService, WorkerSession

__all__ = ["ExampleWorkerServer", "run"]

#: Longest line the reader buffers before it gives up on a connection.
LINE_LIMIT = DEFAULT_MAX_COMMAND_BYTES + 1


class ExampleWorkerServer:
    """Serves the worker engine as JSON lines over TCP (``host:port``).

    Args:
        host / port: where to listen (port 0 picks a free one; :attr:`address` tells).
        max_concurrency: runs executing at once.
        max_command_bytes: longest accepted command line.
        allow_remote_shutdown: obey ``shutdown`` commands (off: the service is shared).
        grace: default drain period in seconds.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, max_concurrency: int = 256,
                 max_command_bytes: int = DEFAULT_MAX_COMMAND_BYTES, allow_remote_shutdown: bool = False,
                 grace: float = 10.0) -> None:
        self.host, self.port = host, port
        self.service = WorkerService(name="example", max_concurrency=max_concurrency, grace=grace,
                                     max_command_bytes=max_command_bytes,
                                     allow_remote_shutdown=allow_remote_shutdown)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> str:
        """Listen; returns the address clients use. Raises OSError when it cannot bind."""
        self._server = await asyncio.start_server(self._handle, self.host, self.port, limit=LINE_LIMIT)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.address

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, drain (see the module docstring), close every connection."""
        if self._server is None:
            return
        self._server.close()
        await self.service.drain(grace)
        if self._connections:
            await asyncio.wait(set(self._connections), timeout=5.0)
        self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        session = self.service.session(str(writer.get_extra_info("peername")))
        sending = asyncio.get_running_loop().create_task(_send(session, writer))
        try:
            while not session.ended:
                await session.wait_readable()  # a client that does not read its events is not read either
                line = await reader.readline()
                if not line:
                    break
                if line.strip():
                    await session.receive(line)
        except (ConnectionError, ValueError):  # reset, or a line over the limit
            pass
        finally:
            if session.ended:  # drained or shut down: let the last events go out
                await asyncio.wait({sending}, timeout=5.0)
            session.connection_lost()
            sending.cancel()
            await asyncio.gather(sending, return_exceptions=True)
            writer.close()
            self._connections.discard(task)


async def _send(session: WorkerSession, writer: asyncio.StreamWriter) -> None:
    while True:
        await session.wait()
        for data in session.data_to_send("lines"):
            writer.write(data)
            await writer.drain()
        if session.ended and not session.events_pending:
            return


def run(args: argparse.Namespace) -> int:
    """``wove worker example``: serve until SIGTERM/SIGINT, then drain."""
    from wove.serve import run_service

    if args.security not in (None, "none"):
        raise ValueError("the example transport cannot authenticate clients; serve it on 127.0.0.1 without "
                         f"--security (got --security {args.security!r}).")
    server = ExampleWorkerServer(host=args.host, port=args.port, max_concurrency=args.max_concurrency,
                                 max_command_bytes=args.max_body_bytes,
                                 allow_remote_shutdown=args.allow_remote_shutdown, grace=args.grace)
    # --metrics-port (a common flag): the session layer counts, run_service serves /metrics
    return run_service("example", server.start, server.stop, grace=args.grace, service=server.service,
                       metrics_port=args.metrics_port, metrics_host=args.metrics_host)
