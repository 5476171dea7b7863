"""Serving, once for every worker service: bind, the ready line, signals and the drain.

A ``wove worker NAME`` runner builds its service and hands :func:`run_service` two
coroutines: ``start()`` (bind and begin accepting; returns the address clients use) and
``stop(grace)`` (the drain: stop accepting, let runs finish within ``grace`` seconds,
end the rest with a terminal event to each client, close). :func:`run_service` prints
``listening on <address>``, waits for SIGTERM or SIGINT, drains, and returns exit status
0; a second signal during the drain exits at once (status 1). A drain that outlives its
grace by :data:`DRAIN_SLACK` seconds exits anyway: a stuck sync task (Python cannot
interrupt a thread) never keeps a worker alive.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable

__all__ = ["DEFAULT_GRACE", "DRAIN_SLACK", "announce_listening", "bind_socket", "run_service"]

logger = logging.getLogger(__name__)

#: Seconds runs in flight may take to finish on SIGTERM (``--grace``).
DEFAULT_GRACE = 10.0
#: Seconds a drain may run past its grace (closing connections, flushing) before the
#: process exits regardless.
DRAIN_SLACK = 10.0


def announce_listening(where: str) -> None:
    """Print the ready line every worker service prints (``listening on <where>``)."""
    print(f"listening on {where}", flush=True)


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind a listening TCP socket on ``host:port`` (port 0 picks a free one).

    Raises:
        OSError: the address cannot be bound (in use, not local, no permission).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def run_service(name: str, start: Callable[[], Awaitable[str]], stop: Callable[[float], Awaitable[None]], *,
                grace: float = DEFAULT_GRACE,
                loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None) -> int:
    """Serve until SIGTERM/SIGINT, then drain (module docstring); returns the exit status.

    Args:
        name: the service, for messages (``http``, ``grpc``...).
        start: binds and starts accepting; returns the address to announce.
        stop: the drain, given the grace period in seconds.
        grace: seconds runs in flight may take to finish.
        loop_factory: makes the event loop to serve on (``uvloop.new_event_loop``: the
            HTTP service serves ~3x the requests on uvloop); Python 3.11+, ignored on 3.10.
    """
    if grace < 0:
        print(f"wove worker {name}: --grace must be 0 or more seconds, got {grace}.", file=sys.stderr)
        return 2
    if loop_factory is not None and sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(_serve(name, start, stop, grace))
    return asyncio.run(_serve(name, start, stop, grace))


async def _serve(name: str, start: Callable[[], Awaitable[str]], stop: Callable[[float], Awaitable[None]],
                 grace: float) -> int:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    signals: list[int] = []

    def on_signal(signum: int) -> None:
        signals.append(signum)
        if len(signals) == 1:
            logger.info("wove worker %s: %s received; draining (grace %.1f s; a second signal exits at once)",
                           name, signal.Signals(signum).name, grace)
            stopping.set()
        else:
            print(f"wove worker {name}: second signal; exiting without draining", file=sys.stderr, flush=True)
            os._exit(1)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    address = await start()
    announce_listening(address)
    await stopping.wait()
    try:
        await asyncio.wait_for(stop(grace), grace + DRAIN_SLACK)
    except asyncio.TimeoutError:
        logger.warning("wove worker %s: the drain outlived its grace by %.0f s; exiting", name, DRAIN_SLACK)
    sys.stdout.flush()
    sys.stderr.flush()
    # Threads still running abandoned sync tasks are daemon threads: nothing waits for them.
    return 0
