"""A contract test kit every worker service runs against itself: ours and third parties'.

The executor kit (:class:`wove.testing.ExecutorContract`) checks what a client sees; this
one checks what a *worker service* does with its clients, the rules of
:mod:`wove.session` seen from outside, with identical assertions for every transport:

* a client that disconnects: its ``cancel`` and ``fail`` runs are cancelled, its
  ``requeue`` and ``detach`` runs and runs with an idempotency key keep running, and a
  re-delivery of the same run gets the execution already going (it runs once);
* a ``shutdown`` command from a client does not stop a shared service;
* drain: on SIGTERM runs in flight finish within ``--grace``, the rest get a terminal
  event, and the process exits 0;
* oversized and malformed commands execute nothing and the service keeps serving.

Subclass :class:`WorkerServiceContract` and name the service and how an executor reaches
it::

    from wove.testing import WorkerServiceContract

    class TestMyService(WorkerServiceContract):
        service = "myproto"                 # `wove worker myproto`
        executor = "myproto"                # the executor that talks to it
        address_key = "url"                 # executor_config key for the printed address

        async def send_raw(self, address, data):   # bytes straight onto the transport
            ...

The service must be a ``wove worker NAME`` subcommand that accepts the common flags
(``--port``, ``--grace``, ``--max-body-bytes``) and prints ``listening on <address>``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any, ClassVar

import pytest

from ..environment import EnvironmentExecutionError, ExecutorRuntime, build_executor_from_name
from ..protocol import TERMINAL_EVENTS
from . import tasks
from .contract import WorkerProcess, run_async

__all__ = ["WorkerServiceContract"]

_CLIENT = textwrap.dedent("""
    import asyncio, json, sys
    from wove.environment import build_executor_from_name
    from wove.testing import tasks

    async def main(name, config, frame):
        frame["callable"] = getattr(tasks, frame["callable"])
        executor = build_executor_from_name(name)
        await executor.start(environment_name="contract", environment_config=config, run_config={})
        await executor.send(frame)
        while True:
            event = await executor.recv()
            if event.get("type") == "task_started":
                print("started", flush=True)
            if event.get("type") in ("task_result", "task_error", "task_cancelled"):
                print(event["type"], flush=True)

    asyncio.run(main(sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])))
""")


def _frame(func: str, args: dict[str, Any], *, run_id: str | None = None, **delivery: Any) -> dict[str, Any]:
    return {"type": "run_task", "run_id": run_id or f"{func}:{uuid.uuid4().hex}", "task_id": func,
            "callable": func, "args": args, "delivery": {k: v for k, v in delivery.items() if v is not None}}


class WorkerServiceContract:
    """The worker-service contract (module docstring). Class attributes to set:

    Attributes:
        service: the ``wove worker`` subcommand.
        executor: the executor name that talks to the service.
        address_key: the executor_config key the printed address goes into.
        worker_args: extra command-line arguments for every worker started.
        contract_timeout: seconds one scenario may take.
    """

    service: ClassVar[str] = ""
    executor: ClassVar[str] = ""
    address_key: ClassVar[str] = "url"
    worker_args: ClassVar[tuple[str, ...]] = ()
    contract_timeout: ClassVar[float] = 40.0

    async def send_raw(self, address: str, data: bytes) -> None:
        """Put ``data`` on the transport as one command, as a client would, and return
        once the service answered or refused it (raising is fine: a refusal)."""
        raise NotImplementedError(f"{type(self).__name__} must implement send_raw for the malformed-input cases")

    # -- helpers ---------------------------------------------------------------
    def start_worker(self, *args: str) -> WorkerProcess:
        worker = WorkerProcess(self.service, *self.worker_args, *args)
        worker.start()
        return worker

    def executor_config(self, worker: WorkerProcess) -> dict[str, Any]:
        """The executor_config that reaches ``worker`` (override for more keys: TLS, security)."""
        return {self.address_key: worker.address}

    def definition(self, worker: WorkerProcess, **delivery: Any) -> dict[str, Any]:
        """An environment definition for ``worker``."""
        return {"executor": self.executor, "executor_config": self.executor_config(worker), **delivery}

    def _client(self, worker: WorkerProcess, frame: dict[str, Any]) -> subprocess.Popen[str]:
        """A client in its own process that sends ``frame`` and waits (killed by the test)."""
        proc = subprocess.Popen(
            [sys.executable, "-c", _CLIENT, self.executor, json.dumps(self.executor_config(worker)),
             json.dumps(frame)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if line != "started":
            proc.kill()
            error = proc.stderr.read() if proc.stderr is not None else ""
            raise AssertionError(f"the client did not see task_started: {line!r}; {error[-2000:]}")
        return proc

    @staticmethod
    def _kill(proc: subprocess.Popen[str]) -> None:
        proc.kill()
        proc.wait(timeout=10)

    @staticmethod
    def _lines(path: Path, at_least: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while True:
            count = len(path.read_text().splitlines()) if path.exists() else 0
            if count >= at_least or time.monotonic() > deadline:
                return count
            time.sleep(0.05)

    # -- disconnect --------------------------------------------------------------
    @pytest.mark.parametrize("policy", ["cancel", "fail"])
    def test_a_disconnected_clients_cancel_and_fail_runs_are_cancelled(self, policy: str, tmp_path: Path) -> None:
        marker = tmp_path / "ran"
        worker = self.start_worker()
        try:
            client = self._client(worker, _frame("record", {"path": str(marker), "seconds": 1.5},
                                                 delivery_orphan_policy=policy))
            self._kill(client)
            assert self._lines(marker, 1, timeout=3.0) == 0, f"a {policy} run went on after its client left"
        finally:
            worker.kill()

    @pytest.mark.parametrize(("policy", "key"), [("requeue", None), ("detach", None), ("cancel", "report-7")])
    def test_kept_runs_finish_once_and_a_redelivery_gets_their_result(
            self, policy: str, key: str | None, tmp_path: Path) -> None:
        marker = tmp_path / "ran"
        frame = _frame("record", {"path": str(marker), "seconds": 1.0}, delivery_orphan_policy=policy,
                       delivery_idempotency_key=key)
        worker = self.start_worker()
        try:
            self._kill(self._client(worker, frame))

            async def redeliver() -> list[dict[str, Any]]:
                executor = build_executor_from_name(self.executor)
                await executor.start(environment_name="contract", environment_config=self.executor_config(worker),
                                     run_config={})
                try:
                    await executor.send({**frame, "callable": tasks.record})
                    events: list[dict[str, Any]] = []
                    while not events or events[-1].get("type") not in TERMINAL_EVENTS:
                        events.append(await executor.recv())
                    return events
                finally:
                    await executor.stop()

            events = run_async(redeliver, self.contract_timeout)
            assert events[-1]["type"] == "task_result", events[-1]
            assert events[-1]["result"] == str(marker)
            assert self._lines(marker, 2, timeout=1.0) == 1, "the re-delivered run executed a second time"
        finally:
            worker.kill()

    # -- shutdown ----------------------------------------------------------------
    def test_a_clients_shutdown_command_does_not_stop_a_shared_service(self) -> None:
        worker = self.start_worker()
        try:
            async def scenario() -> None:
                executor = build_executor_from_name(self.executor)
                await executor.start(environment_name="contract", environment_config=self.executor_config(worker),
                                     run_config={})
                try:
                    await executor.send({"type": "shutdown", "delivery_orphan_policy": "cancel"})
                finally:
                    await executor.stop()
                await asyncio.sleep(0.3)
                async with ExecutorRuntime({"w": self.definition(worker)}, {}) as rt:
                    assert await rt.call("w", tasks.add, 2, 3) == 5

            run_async(scenario, self.contract_timeout)
            assert worker.proc is not None and worker.proc.poll() is None, "the service stopped"
        finally:
            worker.kill()

    # -- drain -------------------------------------------------------------------
    def test_sigterm_drains_runs_in_flight_and_exits_0(self) -> None:
        worker = self.start_worker("--grace", "5")
        try:
            async def scenario() -> list[Any]:
                definition = {"w": self.definition(worker, delivery_timeout=30)}
                async with ExecutorRuntime(definition, {}) as runtime:
                    calls = [asyncio.ensure_future(runtime.call("w", tasks.sleep, 1.0)) for _ in range(20)]
                    await asyncio.sleep(0.4)
                    assert worker.proc is not None
                    worker.proc.send_signal(signal.SIGTERM)
                    return await asyncio.gather(*calls, return_exceptions=True)

            results = run_async(scenario, self.contract_timeout)
            assert results == ["slept"] * 20, f"runs lost in the drain: {results}"
            assert worker.proc is not None
            assert worker.proc.wait(timeout=15) == 0, worker.stderr[-2000:]
        finally:
            worker.kill()

    def test_a_drain_that_outlives_its_grace_ends_every_run(self) -> None:
        worker = self.start_worker("--grace", "0.5")
        try:
            async def scenario() -> BaseException | Any:
                definition = {"w": self.definition(worker, delivery_timeout=30)}
                async with ExecutorRuntime(definition, {}) as runtime:
                    call = asyncio.ensure_future(runtime.call("w", tasks.sleep, 20.0))
                    await asyncio.sleep(0.4)
                    assert worker.proc is not None
                    worker.proc.send_signal(signal.SIGTERM)
                    return (await asyncio.gather(call, return_exceptions=True))[0]

            outcome = run_async(scenario, self.contract_timeout)
            assert isinstance(outcome, BaseException), f"a 20 s run finished in a 0.5 s grace: {outcome!r}"
            assert worker.proc is not None
            assert worker.proc.wait(timeout=15) == 0, worker.stderr[-2000:]
        finally:
            worker.kill()

    # -- limits and malformed input ---------------------------------------------------
    def test_an_oversized_command_executes_nothing_and_the_service_keeps_serving(self, tmp_path: Path) -> None:
        marker = tmp_path / "ran"
        worker = self.start_worker("--max-body-bytes", "65536")
        try:
            async def scenario() -> None:
                async with ExecutorRuntime({"w": self.definition(worker, delivery_timeout=20)}, {}) as runtime:
                    with pytest.raises((EnvironmentExecutionError, OSError, RuntimeError)) as info:
                        await runtime.call("w", tasks.record, str(marker), 0.0, "x" * 200_000)
                    assert "65536" in str(info.value) or "too" in str(info.value).lower(), str(info.value)
                    assert await runtime.call("w", tasks.add, 1, 2) == 3

            run_async(scenario, self.contract_timeout)
            assert not marker.exists()
        finally:
            worker.kill()

    @pytest.mark.parametrize("data", [
        b"not json at all",
        b'{"type": "run_task"}',
        b'{"type": "run_task", "run_id": "r:1", "task_id": "r", "callable_pickle": "!!notbase64", "args_pickle": ""}',
        b'{"type": "launch_missiles"}',
        b"[1, 2, 3]",
    ], ids=["not-json", "no-fields", "bad-pickle", "unknown-type", "not-commands"])
    def test_malformed_input_executes_nothing(self, data: bytes) -> None:
        worker = self.start_worker()
        try:
            async def scenario() -> None:
                try:
                    await asyncio.wait_for(self.send_raw(worker.address, data), 10)
                except asyncio.TimeoutError:
                    raise
                except Exception:
                    pass  # a refusal is a fine answer
                async with ExecutorRuntime({"w": self.definition(worker)}, {}) as rt:
                    assert await rt.call("w", tasks.add, 2, 2) == 4

            run_async(scenario, self.contract_timeout)
            assert worker.proc is not None and worker.proc.poll() is None
            assert "Traceback" not in worker.stderr, worker.stderr[-2000:]
        finally:
            worker.kill()
