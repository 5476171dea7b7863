"""Prometheus metrics of a worker service, counted once in the session layer.

:class:`wove.session.WorkerService` counts what every transport has in common (runs
accepted and completed, execution time, refused requests, sessions) and each shell
reports only what it alone sees (its connections, and a few refusals of its own framing).
The numbers go to a :class:`ServiceMetrics`: one ``prometheus_client``
:class:`~prometheus_client.CollectorRegistry` per service, so several services in one
process (tests, an application mounting two workers) never mix their counts.

``prometheus_client`` is the optional extra ``wove-core[metrics]``; it is imported when a
:class:`ServiceMetrics` is made, never by ``import wove`` or a service without metrics,
and a service that is asked for metrics without it fails at start with the install
command. A service without metrics pays one ``is None`` test per run.

What is exported (``docs/operations.md`` has the table); every label takes one of a
fixed set of values, so the number of series is bounded whatever the load:

* ``wove_worker_info`` (info): ``service`` (``http``, ``grpc``...) and wove-core ``version``;
* ``wove_worker_ready`` (gauge): 1 while accepting runs, 0 while draining;
* ``wove_worker_runs_in_flight`` (gauge): runs the engine admitted and has not finished;
* ``wove_worker_max_concurrency`` (gauge): runs the engine executes at once;
* ``wove_worker_runs_accepted_total`` (counter): runs started here, or attached to an
  execution already going;
* ``wove_worker_runs_completed_total`` (counter): by ``outcome`` (:data:`OUTCOMES`);
* ``wove_worker_run_duration_seconds`` (histogram): ``task_started`` to the terminal
  event, by ``outcome`` (``result``, ``error``, ``cancelled``);
* ``wove_worker_rejected_total`` (counter): by ``reason`` (:data:`REJECTION_REASONS`);
* ``wove_worker_sessions_open`` (gauge) and ``wove_worker_sessions_total`` (counter):
  client conversations (a WebSocket connection, a gRPC call, an HTTP request);
* ``wove_worker_connections_open`` (gauge) and ``wove_worker_connections_total``
  (counter): transport connections, where the server sees them (HTTP, WebSocket).

Plus the ``process_*`` and ``python_info`` series of ``prometheus_client``'s process and
platform collectors (memory, CPU, open files), registered in the same registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .session import WorkerService

__all__ = [
    "DURATION_BUCKETS",
    "INSTALL_HINT",
    "OUTCOMES",
    "REJECTION_REASONS",
    "MetricsServer",
    "ServiceMetrics",
    "ensure_available",
]

#: How an accepted run ended, as the service saw it: its terminal event (``result``,
#: ``error``, ``cancelled``); its client went away and the run keeps running for a
#: re-delivery (``detached``: orphan policy ``requeue`` or ``detach``, or an idempotency
#: key); or the drain ended it without a terminal event so its client delivers it
#: elsewhere (``requeued``).
OUTCOMES = ("result", "error", "cancelled", "detached", "requeued")

#: Why a request (or a command in it) was refused before anything ran:
#:
#: * ``unauthenticated``: no credentials at all (HTTP 401, gRPC UNAUTHENTICATED);
#: * ``bad_credentials``: a wrong signature, token or key id, or a malformed timestamp;
#: * ``expired``: a signature timestamp outside the clock skew (old, or in the future);
#: * ``replay``: a nonce already seen (or a replay cache too full to tell);
#: * ``too_large``: over the size limit (``--max-body-bytes``);
#: * ``bad_frame``: not JSON, not a command, or a command that does not decode;
#: * ``timeout``: a request body that did not arrive in time (HTTP 408);
#: * ``capacity``: a session already at its limit of runs (``TooManyRuns``);
#: * ``draining``: a run (or a new gRPC Session) sent while the service drains.
REJECTION_REASONS = ("unauthenticated", "bad_credentials", "expired", "replay", "too_large", "bad_frame",
                     "timeout", "capacity", "draining")

#: Histogram buckets of ``wove_worker_run_duration_seconds``: from a no-op to an hour.
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                    300.0, 600.0, 1800.0, 3600.0)

#: What to run when ``prometheus_client`` is missing.
INSTALL_HINT = 'pip install "wove-core[metrics]"'


def ensure_available() -> None:
    """Check that ``prometheus_client`` can be imported (without importing it).

    Raises:
        ImportError: it is not installed; the message gives the install command.
    """
    from importlib.util import find_spec

    if find_spec("prometheus_client") is None:
        raise ImportError(_missing_message())


def _missing_message() -> str:
    return (f"Worker metrics need prometheus-client, which is not installed. Install it with: {INSTALL_HINT} "
            "(or leave out --metrics / --metrics-port).")


@dataclass(eq=False)
class MetricsServer:
    """A running metrics endpoint (:meth:`ServiceMetrics.serve`): where it is and how to stop it."""

    url: str
    host: str
    port: int
    _close: Callable[[], None] = field(repr=False)

    def close(self) -> None:
        """Stop serving (safe to call more than once)."""
        close, self._close = self._close, _nothing
        close()


def _nothing() -> None:
    return None


class ServiceMetrics:
    """The Prometheus metrics of one worker service (module docstring).

    Args:
        service: the service's name, exported as the ``service`` label of ``wove_worker_info``.
        registry: the ``prometheus_client.CollectorRegistry`` to register in (default: a
            new one, this service's own; pass ``prometheus_client.REGISTRY`` to export with
            an application's other metrics; two services cannot share one).
        process: also register the process and platform collectors (``process_*``,
            ``python_info``); leave it off when ``registry`` already has them.

    Raises:
        ImportError: ``prometheus_client`` is not installed (the message says how to install it).
        ValueError: ``registry`` already holds a service's metrics.
    """

    def __init__(self, service: str = "worker", *, registry: Any = None, process: bool | None = None) -> None:
        try:
            import prometheus_client as prom
        except ImportError as exc:
            raise ImportError(_missing_message()) from exc
        own = registry is None
        self.registry: Any = prom.CollectorRegistry(auto_describe=True) if own else registry
        self.service = service
        self._prom = prom
        reg = self.registry
        try:
            version = _version()
            prom.Info("wove_worker", "The worker service: its transport and wove-core version.",
                      registry=reg).info({"service": service, "version": version})
        except ValueError as exc:  # "Duplicated timeseries in CollectorRegistry"
            raise ValueError(f"This registry already holds a Wove worker service's metrics ({exc}); give each "
                             "service its own registry (the default).") from None
        self._ready = prom.Gauge("wove_worker_ready", "1 while the service accepts runs; 0 while it drains.",
                                 registry=reg)
        self._in_flight = prom.Gauge("wove_worker_runs_in_flight",
                                     "Runs admitted by the worker engine and not finished (queued or executing).",
                                     registry=reg)
        self._capacity = prom.Gauge("wove_worker_max_concurrency", "Runs the worker engine executes at once.",
                                    registry=reg)
        self._accepted = prom.Counter("wove_worker_runs_accepted", "Runs this service started, or attached to an "
                                      "execution already going (a re-delivery).", registry=reg)
        completed = prom.Counter("wove_worker_runs_completed", "Accepted runs that ended, by outcome: result, "
                                 "error, cancelled (their terminal event), detached (the client went away; the "
                                 "run keeps going for a re-delivery), requeued (ended by the drain without a "
                                 "terminal event, for another worker).", ["outcome"], registry=reg)
        duration = prom.Histogram("wove_worker_run_duration_seconds", "Execution time on this worker: from a "
                                  "run's task_started to its terminal event, by outcome.", ["outcome"],
                                  buckets=DURATION_BUCKETS, registry=reg)
        rejected = prom.Counter("wove_worker_rejected", "Requests or commands refused before anything ran, by "
                                "reason: " + ", ".join(REJECTION_REASONS) + ".", ["reason"], registry=reg)
        self._sessions_open = prom.Gauge("wove_worker_sessions_open", "Client sessions open (a WebSocket "
                                         "connection, a gRPC call, an HTTP request).", registry=reg)
        self._sessions = prom.Counter("wove_worker_sessions", "Client sessions opened.", registry=reg)
        self._connections_open = prom.Gauge("wove_worker_connections_open", "Transport connections open "
                                            "(HTTP and WebSocket services).", registry=reg)
        self._connections = prom.Counter("wove_worker_connections", "Transport connections accepted (HTTP and "
                                         "WebSocket services).", registry=reg)
        # every series exists from the start (at 0): a rate() over a new label is never missing
        self._completed = {outcome: completed.labels(outcome) for outcome in OUTCOMES}
        self._duration = {outcome: duration.labels(outcome) for outcome in OUTCOMES[:3]}
        self._rejected = {reason: rejected.labels(reason) for reason in REJECTION_REASONS}
        if process if process is not None else own:
            prom.ProcessCollector(registry=reg)
            prom.PlatformCollector(registry=reg)
        self._bound: WorkerService | None = None

    def bind(self, service: WorkerService) -> None:
        """Read the gauges that are state (ready, in flight, capacity) from ``service``
        when scraped (:meth:`WorkerService.enable_metrics <wove.session.WorkerService.enable_metrics>`
        calls it)."""
        if self._bound is not None and self._bound is not service:
            raise ValueError(f"These metrics already belong to the {self._bound.name} service; give each "
                             "service its own ServiceMetrics.")
        self._bound = service
        engine = service.engine
        self._ready.set_function(lambda: 1.0 if service.ready else 0.0)
        self._in_flight.set_function(lambda: float(engine.active))
        self._capacity.set(engine.max_concurrency)

    # -- counting (the session layer calls these) ---------------------------------
    def run_accepted(self) -> None:
        self._accepted.inc()

    def run_finished(self, outcome: str, seconds: float | None = None) -> None:
        """An accepted run ended with ``outcome`` (:data:`OUTCOMES`); ``seconds`` of
        execution are observed for ``result``, ``error`` and ``cancelled``."""
        self._completed[outcome].inc()
        if seconds is not None:
            histogram = self._duration.get(outcome)
            if histogram is not None:
                histogram.observe(seconds)

    def rejected(self, reason: str) -> None:
        """A request or command was refused for ``reason`` (:data:`REJECTION_REASONS`).

        Raises:
            ValueError: ``reason`` is not one of them (labels stay a fixed set).
        """
        counter = self._rejected.get(reason)
        if counter is None:
            raise ValueError(f"Unknown rejection reason {reason!r}; use one of {', '.join(REJECTION_REASONS)}.")
        counter.inc()

    def session_opened(self) -> None:
        self._sessions.inc()
        self._sessions_open.inc()

    def session_closed(self) -> None:
        self._sessions_open.dec()

    def connection_opened(self) -> None:
        self._connections.inc()
        self._connections_open.inc()

    def connection_closed(self) -> None:
        self._connections_open.dec()

    # -- exposition ---------------------------------------------------------------
    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The metrics in the text format the ``Accept`` header asks for (Prometheus
        text, or OpenMetrics); returns ``(body, content type)``."""
        from prometheus_client.exposition import choose_encoder

        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> MetricsServer:
        """Serve ``/metrics`` over HTTP on ``host:port`` (``prometheus_client``'s server, in
        a daemon thread, so a scrape never waits for the event loop; port 0 picks a free one).

        Raises:
            OSError: the address cannot be bound.
        """
        httpd, thread = self._prom.start_http_server(port, addr=host, registry=self.registry)
        bound = int(httpd.server_port)
        shown = f"[{host}]" if ":" in host else host

        def close() -> None:
            httpd.shutdown()  # waits for the serving loop to stop (at most its 0.5 s poll)
            httpd.server_close()
            thread.join(timeout=5.0)

        return MetricsServer(f"http://{shown}:{bound}/metrics", host, bound, close)


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("wove-core")
    except metadata.PackageNotFoundError:  # pragma: no cover - a source tree without metadata
        return "unknown"
