"""Interop with Wove 2.0.3 (a throwaway venv with wove==2.0.3 and Celery).

* A Wove 2.0.3 client's ``celery`` environment runs tasks on our workers (the task name
  ``wove.run_backend_payload``; a 2.x payload has no callback key, so callbacks go unsigned,
  as its callback server expects).
* Our celery executor runs tasks on a Celery worker with Wove 2.0.3 (its task calls
  ``wove.integrations.worker.run``); such workers post unsigned callbacks, so the
  environment sets ``require_signed_callbacks: False``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from wove.environment import ExecutorRuntime

pytestmark = [pytest.mark.interop, pytest.mark.integration, pytest.mark.timeout(120)]

WOVE2_CLIENT = textwrap.dedent('''
    import asyncio, json, sys
    from celery import Celery
    from wove.environment import BackendAdapterEnvironmentExecutor

    broker, backend, settings, queue = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]

    async def main():
        app = Celery("wove2-client", broker=broker, backend=backend)
        app.conf.update(settings)
        executor = BackendAdapterEnvironmentExecutor("celery")
        await executor.start(environment_name="interop", run_config={},
                             environment_config={"app": app, "queue": queue})
        offset = 40

        def fail():
            raise KeyError("from the 2.x client")

        frames = [
            {"type": "run_task", "run_id": "add:1", "task_id": "add", "callable": lambda a, b: a + b + offset,
             "args": {"a": 1, "b": 1}, "delivery": {}},
            {"type": "run_task", "run_id": "fail:2", "task_id": "fail", "callable": fail, "args": {},
             "delivery": {}},
        ]
        for frame in frames:
            await executor.send(frame)
        out = {}
        while len(out) < len(frames):
            event = await asyncio.wait_for(executor.recv(), 60)
            if event["type"] in ("task_result", "task_error", "task_cancelled"):
                out[event["run_id"]] = {"type": event["type"], "result": repr(event.get("result")),
                                        "exception": repr(event.get("exception"))}
        await executor.stop()
        print(json.dumps(out))

    asyncio.run(main())
''')

WOVE2_WORKER_APP = textwrap.dedent('''
    """A Celery app as Wove 2.x documents it: its task calls wove.integrations.worker.run."""
    from celery import Celery
    from wove.integrations.worker import run

    app = Celery("wove2-worker")
    app.config_from_envvar("CELERY_CONFIG_MODULE")


    @app.task(name="wove.run_backend_payload")
    def wove_task(payload):
        return run(payload)
''')


def test_wove2_client_runs_tasks_on_our_worker(wove2_celery_python: Path, redis_worker: Any) -> None:
    service = redis_worker.service
    result = subprocess.run([str(wove2_celery_python), "-c", WOVE2_CLIENT, service.broker_url, service.result_backend,
                             json.dumps(service.settings), redis_worker.queue],
                            capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["add:1"] == {"type": "task_result", "result": "42", "exception": "None"}
    assert out["fail:2"]["type"] == "task_error" and "from the 2.x client" in out["fail:2"]["exception"]
    assert "'posted': True, 'type': 'task_result', 'run_id': 'add:1'" in redis_worker.output  # ran by our worker


@pytest.fixture(scope="module")
def wove2_worker(wove2_celery_python: Path, redis_celery: Any, celery_worker_factory: Any,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A Celery worker in the Wove 2.0.3 venv (prefork, 2 pool processes) on Redis."""
    folder = tmp_path_factory.mktemp("wove2-worker")
    (folder / "wove2_worker_app.py").write_text(WOVE2_WORKER_APP)
    worker = celery_worker_factory(redis_celery, python=str(wove2_celery_python), app="wove2_worker_app",
                                   extra_path=str(folder), concurrency=2)
    yield worker
    worker.stop()


async def test_our_executor_runs_tasks_on_a_wove2_worker(wove2_worker: Any) -> None:
    config = wove2_worker.executor_config(require_signed_callbacks=False)
    async with ExecutorRuntime({"celery": {"executor": "celery", "executor_config": config}}, {}) as runtime:
        # the 2.x venv has no wove.testing: the tasks are closures, pickled by value
        offset = 40

        async def echo(value: Any) -> Any:
            return value

        def fail(message: str) -> None:
            raise LookupError(message)

        assert await asyncio.wait_for(runtime.call("celery", lambda a: a + offset, 2), 60) == 42
        assert await asyncio.wait_for(runtime.call("celery", echo, "across"), 60) == "across"
        with pytest.raises(LookupError, match=r"from a 2\.x worker"):
            await asyncio.wait_for(runtime.call("celery", fail, "from a 2.x worker"), 60)
        results = await asyncio.wait_for(
            asyncio.gather(*(runtime.call("celery", lambda i: i * 2, i) for i in range(20))), 60)
        assert results == [2 * i for i in range(20)]
    assert "wove.run_backend_payload" in wove2_worker.output


async def test_signed_callbacks_by_default_refuse_a_wove2_worker(wove2_worker: Any) -> None:
    """The default (require_signed_callbacks true) refuses 2.x workers' unsigned callbacks: the
    run does not hang, it ends once Celery reports the task failed, saying what to set."""
    from wove.environment import EnvironmentExecutionError

    async with ExecutorRuntime({"celery": {"executor": "celery",
                                           "executor_config": wove2_worker.executor_config()}}, {}) as runtime:
        with pytest.raises(EnvironmentExecutionError, match="require_signed_callbacks to false") as info:
            await asyncio.wait_for(runtime.call("celery", lambda: 3), 60)
    assert info.value.payload["source"] == "transport"
