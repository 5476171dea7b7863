"""Serving, once for every worker service: bind, the ready line, signals and the drain.

A ``wove worker NAME`` runner builds its service and hands :func:`run_service` two
coroutines: ``start()`` (bind and begin accepting; returns the address clients use) and
``stop(grace)`` (the drain: stop accepting, let runs finish within ``grace`` seconds,
end the rest with a terminal event to each client, close). :func:`run_service` prints
``listening on <address>``, waits for SIGTERM or SIGINT, drains, and returns exit status
0; a second signal during the drain exits at once (status 1). A drain that outlives its
grace by :data:`DRAIN_SLACK` seconds exits anyway: a stuck sync task (Python cannot
interrupt a thread) never keeps a worker alive.

With ``metrics_port`` (``wove worker ... --metrics-port PORT``) it also serves the
service's Prometheus metrics (:mod:`wove.metrics`) at ``http://HOST:PORT/metrics`` from
before the ready line until the process exits (through the drain, so a scrape sees it),
and prints ``metrics on <URL>`` right after the ready line.

Probes, the same meaning on every transport (each answers them in its own convention:
HTTP ``/healthz`` and ``/readyz``, gRPC ``grpc.health.v1.Health``, a WebSocket
service's HTTP ``GET /healthz`` and ``/readyz``): *live* while the process serves,
draining included (a liveness probe that failed during a drain would have the
orchestrator kill runs the drain is letting finish); *ready* while it accepts runs
(:attr:`wove.session.WorkerService.ready`), not from the first signal on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .metrics import MetricsServer, ServiceMetrics
    from .session import WorkerService

__all__ = ["DEFAULT_GRACE", "DRAIN_SLACK", "announce_listening", "announce_metrics", "bind_socket",
           "run_service", "start_metrics"]

logger = logging.getLogger(__name__)

#: Seconds runs in flight may take to finish on SIGTERM (``--grace``).
DEFAULT_GRACE = 10.0
#: Seconds a drain may run past its grace (closing connections, flushing) before the
#: process exits regardless.
DRAIN_SLACK = 10.0


def announce_listening(where: str) -> None:
    """Print the ready line every worker service prints (``listening on <where>``)."""
    print(f"listening on {where}", flush=True)


def announce_metrics(url: str) -> None:
    """Print where the metrics are (``metrics on <url>``), the line after the ready line."""
    print(f"metrics on {url}", flush=True)


def start_metrics(service: WorkerService | ServiceMetrics, host: str, port: int) -> MetricsServer:
    """Serve a service's metrics at ``http://host:port/metrics`` (port 0 picks a free one).

    Args:
        service: a :class:`~wove.session.WorkerService` (its metrics are enabled:
            :meth:`~wove.session.WorkerService.enable_metrics`), or the
            :class:`~wove.metrics.ServiceMetrics` a service counts into (or will, once started).

    Raises:
        ImportError: ``prometheus_client`` is not installed (the message says how to install it).
        OSError: the metrics address cannot be bound.
    """
    from .session import WorkerService

    metrics = service.enable_metrics() if isinstance(service, WorkerService) else service
    try:
        return metrics.serve(host, port)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot serve metrics on {host}:{port} (--metrics-port): {exc.strerror or exc}; "
                      "pick another --metrics-port (0 picks a free one)") from None


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
                loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
                service: WorkerService | ServiceMetrics | None = None, metrics_port: int | None = None,
                metrics_host: str | None = None) -> int:
    """Serve until SIGTERM/SIGINT, then drain (module docstring); returns the exit status.

    Args:
        name: the service, for messages (``http``, ``grpc``...).
        start: binds and starts accepting; returns the address to announce.
        stop: the drain, given the grace period in seconds.
        grace: seconds runs in flight may take to finish.
        loop_factory: makes the event loop to serve on (``uvloop.new_event_loop``: the
            HTTP service serves ~3x the requests on uvloop); Python 3.11+, ignored on 3.10.
        service: the :class:`~wove.session.WorkerService` behind ``start``, or the
            :class:`~wove.metrics.ServiceMetrics` it counts into when ``start`` builds the
            service (needed for ``metrics_port``).
        metrics_port: serve ``service``'s Prometheus metrics on this port (0: a free one;
            None: no metrics endpoint), on ``metrics_host`` (default 127.0.0.1).

    Raises:
        ValueError: ``metrics_port`` without ``service``.
        ImportError / OSError: the metrics cannot be served (see :func:`start_metrics`).
    """
    if grace < 0:
        print(f"wove worker {name}: --grace must be 0 or more seconds, got {grace}.", file=sys.stderr)
        return 2
    metrics: MetricsServer | None = None
    if metrics_port is not None:
        if service is None:
            raise ValueError(f"wove worker {name}: --metrics-port needs the service's WorkerService "
                             "(run_service(..., service=...)).")
        metrics = start_metrics(service, metrics_host or "127.0.0.1", metrics_port)
    try:
        if loop_factory is not None and sys.version_info >= (3, 11):
            with asyncio.Runner(loop_factory=loop_factory) as runner:
                return runner.run(_serve(name, start, stop, grace, metrics))
        return asyncio.run(_serve(name, start, stop, grace, metrics))
    finally:
        if metrics is not None:
            metrics.close()


async def _serve(name: str, start: Callable[[], Awaitable[str]], stop: Callable[[float], Awaitable[None]],
                 grace: float, metrics: MetricsServer | None) -> int:
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
    if metrics is not None:
        announce_metrics(metrics.url)
    await stopping.wait()
    try:
        await asyncio.wait_for(stop(grace), grace + DRAIN_SLACK)
    except asyncio.TimeoutError:
        logger.warning("wove worker %s: the drain outlived its grace by %.0f s; exiting", name, DRAIN_SLACK)
    sys.stdout.flush()
    sys.stderr.flush()
    # Threads still running abandoned sync tasks are daemon threads: nothing waits for them.
    return 0
