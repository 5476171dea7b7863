"""Wove's celery environment vs raw Celery (``delay().get()``) against the same worker.

Run: ``uv run --no-sync python bench/bench_celery.py [--broker redis|rabbitmq] [--calls 200]
[--tasks 1000] [--cpu-tasks 8] [--burn 10000000] [--concurrency 2]``.

One ``celery worker`` (prefork) runs both the Wove task (``wove.run_backend_payload``) and
two plain Celery tasks (``bench.add``, ``bench.burn``) calling the same functions, so both
sides share the worker, its pool processes and the broker. Redis: broker in database 1,
results in database 2 (keys under a throwaway prefix, deleted afterwards); RabbitMQ: a
throwaway vhost, results over ``rpc://``. Each round runs raw Celery and Wove back to back,
alternating which goes first, and the best of the rounds is kept. Prints:

* per-call latency of sequential no-op calls (raw: ``add.delay(i, 0).get()``);
* per-task cost of many no-op calls in flight at once (raw: ``delay`` them all, then ``get``);
* wall time of CPU-bound tasks, several per pool process,

with ratios (targets: no-op within 2x of raw Celery, CPU-bound within 1.2x).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from wove.environment import ExecutorRuntime
from wove.testing import tasks

WORKER_APP = textwrap.dedent('''
    """The bench worker: the Wove task plus plain Celery tasks running the same functions."""
    from wove.testing import tasks
    from wove_executor_celery.worker import app


    @app.task(name="bench.add")
    def add(a, b):
        return tasks.add(a, b)


    @app.task(name="bench.burn")
    def burn(n):
        return tasks.burn(n)
''')


class Service:
    """A broker and result backend for the bench, cleaned up afterwards."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.tag = uuid.uuid4().hex[:10]
        if kind == "redis":
            prefix = f"wove-bench-{self.tag}:"
            self.broker, self.backend = "redis://127.0.0.1:6379/1", "redis://127.0.0.1:6379/2"
            self.settings: dict[str, Any] = {"broker_transport_options": {"global_keyprefix": prefix},
                                             "result_backend_transport_options": {"global_keyprefix": prefix}}
            self._prefix = prefix
        else:
            self.vhost = f"wove-bench-{self.tag}"
            subprocess.run(["rabbitmqctl", "add_vhost", self.vhost], check=True, capture_output=True)
            subprocess.run(["rabbitmqctl", "set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*"],
                           check=True, capture_output=True)
            self.broker, self.backend, self.settings = f"amqp://guest:guest@127.0.0.1:5672/{self.vhost}", "rpc://", {}

    def close(self) -> None:
        if self.kind == "redis":
            import redis

            for db in (1, 2):
                client = redis.Redis(db=db)
                keys = list(client.scan_iter(match=f"{self._prefix}*", count=1000))
                for start in range(0, len(keys), 500):
                    client.delete(*keys[start:start + 500])
                client.close()
        else:
            subprocess.run(["rabbitmqctl", "delete_vhost", self.vhost], check=False, capture_output=True)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started it dies (Linux), so a
    killed test or bench run leaves no worker behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def start_worker(service: Service, folder: Path, queue: str, concurrency: int) -> subprocess.Popen[str]:
    (folder / "bench_celery_app.py").write_text(WORKER_APP)
    (folder / "bench_celeryconfig.py").write_text("".join(f"{k} = {v!r}\n" for k, v in service.settings.items()))
    env = {**os.environ, "CELERY_BROKER_URL": service.broker, "CELERY_RESULT_BACKEND": service.backend,
           "CELERY_CONFIG_MODULE": "bench_celeryconfig",
           "PYTHONPATH": os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "bench_celery_app", "worker", "-Q", queue,
                             "-P", "prefork", "-c", str(concurrency), "-l", "WARNING", "-n", f"{queue}@127.0.0.1",
                             "--without-gossip", "--without-mingle"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True, preexec_fn=_die_with_parent)
    def drain() -> None:  # the worker's output, so it never blocks on a full pipe
        assert proc.stdout is not None
        for line in proc.stdout:
            if "ERROR" in line or "Traceback" in line:
                print(f"worker: {line}", end="", file=sys.stderr)

    threading.Thread(target=drain, daemon=True).start()
    return proc


def wait_ready(app: Any, queue: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if app.control.ping(destination=[f"{queue}@127.0.0.1"], timeout=1.0):
            return
    raise RuntimeError("the bench worker did not answer a ping")


def raw_sequential(app: Any, queue: str, calls: int) -> float:
    start = time.perf_counter()
    for i in range(calls):
        assert app.send_task("bench.add", args=(i, 0), queue=queue).get(timeout=30) == i
    return time.perf_counter() - start


def raw_parallel(app: Any, queue: str, name: str, args: list[tuple[Any, ...]]) -> float:
    start = time.perf_counter()
    results = [app.send_task(name, args=a, queue=queue) for a in args]
    for result in results:
        result.get(timeout=300)
    return time.perf_counter() - start


async def wove_sequential(runtime: ExecutorRuntime, calls: int) -> float:
    start = time.perf_counter()
    for i in range(calls):
        assert await runtime.call("celery", tasks.add, i, 0) == i
    return time.perf_counter() - start


async def wove_parallel(runtime: ExecutorRuntime, func: Any, args: list[tuple[Any, ...]]) -> float:
    start = time.perf_counter()
    await asyncio.gather(*(runtime.call("celery", func, *a) for a in args))
    return time.perf_counter() - start


async def best_of(rounds: int, raw: Callable[[], float], wove: Callable[[], Awaitable[float]]) -> tuple[float, float]:
    """Best raw and Wove times over ``rounds`` alternating rounds (raw runs in a thread)."""
    raw_times: list[float] = []
    wove_times: list[float] = []
    for i in range(rounds):
        if i % 2 == 0:
            raw_times.append(await asyncio.to_thread(raw))
            wove_times.append(await wove())
        else:
            wove_times.append(await wove())
            raw_times.append(await asyncio.to_thread(raw))
    return min(raw_times), min(wove_times)


async def main(args: argparse.Namespace) -> None:
    from celery import Celery

    # Raw Celery's AsyncResults sit in reference cycles, and when the cyclic collector
    # destroys one in the middle of a Redis command, its __del__ (an UNSUBSCRIBE on the same
    # pub/sub connection) deadlocks the raw side. No collections during the bench, for both
    # sides alike. (The celery executor detaches its own results; see _bridge._release.)
    gc.disable()

    service = Service(args.broker)
    queue = f"wove-bench-{service.tag}"
    proc = None
    app = Celery("bench-raw", broker=service.broker, backend=service.backend, set_as_current=False)
    app.conf.update(service.settings)
    try:
        with tempfile.TemporaryDirectory() as folder:
            proc = start_worker(service, Path(folder), queue, args.concurrency)
            await asyncio.to_thread(wait_ready, app, queue)
            config = {"broker_url": service.broker, "result_backend": service.backend, "queue": queue,
                      "app_config": service.settings}
            async with ExecutorRuntime({"celery": {"executor": "celery", "executor_config": config}}, {}) as runtime:
                noop = [(i, 0) for i in range(args.tasks)]
                cpu_tasks = args.cpu_tasks or 4 * args.concurrency
                cpu = [(args.burn,) for _ in range(cpu_tasks)]
                for _ in range(2):  # warm up both paths (pool processes, connections)
                    await asyncio.to_thread(raw_parallel, app, queue, "bench.add", noop[:100])
                    await wove_parallel(runtime, tasks.add, noop[:100])
                raw_seq, wove_seq = await best_of(args.rounds, lambda: raw_sequential(app, queue, args.calls),
                                                  lambda: wove_sequential(runtime, args.calls))
                raw_par, wove_par = await best_of(args.rounds, lambda: raw_parallel(app, queue, "bench.add", noop),
                                                  lambda: wove_parallel(runtime, tasks.add, noop))
                raw_cpu, wove_cpu = await best_of(args.rounds, lambda: raw_parallel(app, queue, "bench.burn", cpu),
                                                  lambda: wove_parallel(runtime, tasks.burn, cpu))
    finally:
        gc.enable()
        gc.collect()  # now, not at interpreter exit (raw results unsubscribe in __del__)
        app.close()
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        service.close()
    backend = "Redis (broker db 1, results db 2)" if args.broker == "redis" else "RabbitMQ (rpc:// results)"
    print(f"celery worker: prefork, {args.concurrency} pool processes; {backend}; best of {args.rounds} rounds")
    print(f"{'':34}{'raw Celery':>14}{'Wove':>14}{'ratio':>8}")
    print(f"{'no-op, sequential (ms per call)':34}{raw_seq / args.calls * 1e3:>14.2f}"
          f"{wove_seq / args.calls * 1e3:>14.2f}{wove_seq / raw_seq:>8.2f}")
    print(f"{f'no-op, {args.tasks} in flight (ms/task)':34}{raw_par / args.tasks * 1e3:>14.3f}"
          f"{wove_par / args.tasks * 1e3:>14.3f}{wove_par / raw_par:>8.2f}")
    print(f"{f'CPU-bound, {cpu_tasks} x burn (s wall)':34}{raw_cpu:>14.3f}{wove_cpu:>14.3f}{wove_cpu / raw_cpu:>8.2f}")
    print("targets: no-op within 2x of raw Celery, CPU-bound within 1.2x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", choices=["redis", "rabbitmq"], default="redis")
    parser.add_argument("--calls", type=int, default=200, help="sequential no-op calls per round")
    parser.add_argument("--tasks", type=int, default=1000, help="no-op tasks in flight at once per round")
    parser.add_argument("--cpu-tasks", type=int, default=0, help="CPU-bound tasks (default: 4 per pool process)")
    parser.add_argument("--burn", type=int, default=10_000_000, help="loop iterations of each CPU-bound task")
    parser.add_argument("--concurrency", type=int, default=2, help="pool processes of the worker")
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(main(parser.parse_args()))
