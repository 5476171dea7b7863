"""A Temporal worker that hosts the Wove workflow and activity.

Run it where the tasks should execute (the tasks' code and ``wove-executor-temporal``
installed)::

    python -m wove_executor_temporal.worker --target-host 127.0.0.1:7233 --task-queue wove

It prints ``listening on task queue <q> at <host> (namespace <ns>)`` once it polls, and on
SIGTERM or SIGINT stops polling, lets running activities finish for ``--grace`` seconds,
then cancels the rest (their runs end with a ``WorkerStopped`` error) and exits 0.

To host the Wove workflow in a worker of your own, register
:class:`~wove_executor_temporal.workflow.WovePayloadWorkflow` and
:class:`~wove_executor_temporal.activity.PayloadActivity` (``PayloadActivity().run``), or
call :func:`build_worker`.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import os
import signal
import sys
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

__all__ = ["DEFAULT_HEARTBEAT_THROTTLE", "build_worker", "main", "parse_args", "serve"]

logger = logging.getLogger(__name__)

#: Longest seconds between two heartbeats the worker actually sends to the server. A
#: cancellation reaches a running activity in a heartbeat's answer, so this bounds how
#: long a cancelled run keeps going (Temporal's own default is up to 60 s).
DEFAULT_HEARTBEAT_THROTTLE = 1.0


def build_worker(client: Any, task_queue: str, *, threads: concurrent.futures.Executor | None = None,
                 heartbeat_throttle: float = DEFAULT_HEARTBEAT_THROTTLE, grace: float = 10.0,
                 cached_workflows: int = 0, **worker_options: Any) -> Any:
    """A ``temporalio.worker.Worker`` on ``task_queue`` hosting the Wove workflow and activity.

    Args:
        client: a connected ``temporalio.client.Client``.
        task_queue: the task queue (``executor_config.task_queue`` of the callers).
        threads: the pool sync task callables run in (default: the engine's daemon threads).
        heartbeat_throttle: longest seconds between heartbeats sent to the server (how fast
            a cancellation reaches a running task).
        grace: seconds running activities get to finish when the worker shuts down.
        cached_workflows: workflows kept in this worker's cache (``max_cached_workflows``).
            0 (the default) turns Temporal's sticky execution off: the Wove workflow's
            history is three events long, so replaying it costs little, and when this
            worker dies another one takes over its workflows at once instead of after the
            sticky queue's schedule-to-start timeout (10 s).
        **worker_options: more ``Worker`` keyword arguments (``max_concurrent_activities``...).
    """
    from temporalio.worker import Worker

    from .activity import PayloadActivity
    from .workflow import WovePayloadWorkflow

    options: dict[str, Any] = {
        "max_heartbeat_throttle_interval": timedelta(seconds=heartbeat_throttle),
        "default_heartbeat_throttle_interval": timedelta(seconds=heartbeat_throttle),
        "graceful_shutdown_timeout": timedelta(seconds=grace),
        "max_cached_workflows": cached_workflows,
        **worker_options,
    }
    return Worker(client, task_queue=task_queue, workflows=[WovePayloadWorkflow],
                  activities=[PayloadActivity(threads).run], **options)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line of ``python -m wove_executor_temporal.worker``."""
    parser = argparse.ArgumentParser(
        prog="python -m wove_executor_temporal.worker",
        description="Temporal worker running Wove tasks (workflow WovePayloadWorkflow, activity run_wove_payload).")
    parser.add_argument("--target-host", default="127.0.0.1:7233", help="Temporal frontend host:port")
    parser.add_argument("--namespace", default="default", help="Temporal namespace")
    parser.add_argument("--task-queue", default="wove", help="task queue to poll (the callers' task_queue)")
    parser.add_argument("--max-concurrent-activities", type=int, default=100,
                        help="Wove runs executing at once in this worker")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for sync task callables (default: the engine's, 64)")
    parser.add_argument("--grace", type=float, default=10.0,
                        help="seconds running tasks get to finish on SIGTERM before they are cancelled")
    parser.add_argument("--heartbeat-throttle", type=float, default=DEFAULT_HEARTBEAT_THROTTLE,
                        help="longest seconds between heartbeats sent to Temporal (bounds cancellation latency)")
    parser.add_argument("--cached-workflows", type=int, default=0,
                        help="workflows cached for sticky execution (0: none; another worker takes over at once)")
    parser.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to reach the server")
    parser.add_argument("--log-level", default="WARNING", help="logging level (DEBUG, INFO, WARNING...)")
    args = parser.parse_args(argv)
    if args.cached_workflows < 0:
        parser.error(f"--cached-workflows must be 0 or more, got {args.cached_workflows}")
    for name in ("max_concurrent_activities", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    for name in ("grace", "heartbeat_throttle", "connect_timeout"):
        if getattr(args, name) < 0 or (name != "grace" and getattr(args, name) == 0):
            parser.error(f"--{name.replace('_', '-')} must be a positive number of seconds, got {getattr(args, name)}")
    return args


async def serve(args: argparse.Namespace) -> int:
    """Connect, poll until SIGTERM/SIGINT, drain; return the exit code."""
    from temporalio.client import Client

    try:
        client = await asyncio.wait_for(Client.connect(args.target_host, namespace=args.namespace),
                                        args.connect_timeout)
    except (Exception, asyncio.TimeoutError) as exc:
        print(f"cannot connect to the Temporal server at {args.target_host} (namespace {args.namespace}) within "
              f"{args.connect_timeout:g} s: {type(exc).__name__}: {exc}. Start it (temporal server start-dev) or "
              "pass --target-host.", file=sys.stderr, flush=True)
        return 1
    threads = (concurrent.futures.ThreadPoolExecutor(args.threads, thread_name_prefix="wove-temporal")
               if args.threads else None)
    worker = build_worker(client, args.task_queue, threads=threads, heartbeat_throttle=args.heartbeat_throttle,
                          grace=args.grace, cached_workflows=args.cached_workflows,
                          max_concurrent_activities=args.max_concurrent_activities)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    running = asyncio.ensure_future(worker.run())
    print(f"listening on task queue {args.task_queue} at {args.target_host} (namespace {args.namespace})",
          flush=True)
    waiter = asyncio.ensure_future(stop.wait())
    await asyncio.wait({running, waiter}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if running.done():
        waiter.cancel()
        failure = running.exception()
        print(f"the Temporal worker stopped: {type(failure).__name__}: {failure}" if failure
              else "the Temporal worker stopped", file=sys.stderr, flush=True)
        code = 1 if failure else 0
    else:
        await worker.shutdown()
        await asyncio.gather(running, return_exceptions=True)
    if threads is not None:
        threads.shutdown(wait=False, cancel_futures=True)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m wove_executor_temporal.worker``."""
    args = parse_args(argv)
    logging.basicConfig(level=str(args.log_level).upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(serve(args))


def _exit(code: int) -> None:
    """Exit without interpreter finalization: temporalio's Rust threads can still call into
    Python while it finalizes and abort the process (temporalio/sdk-python#300), which would
    turn a clean exit into SIGABRT. Everything of ours is flushed and closed by then."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit(main())
