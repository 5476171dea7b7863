"""Fixtures: the machine's Redis and RabbitMQ, isolated per test session, and real ``celery
worker`` processes on them.

Redis: broker in database 1, results in database 2, every key under a per-session
``global_keyprefix`` (deleted afterwards). RabbitMQ: a per-session vhost (deleted
afterwards), results over ``rpc://``. Workers are ``celery -A wove_executor_celery.worker
worker`` subprocesses, shared by the session (a killed pool process is replaced by Celery).
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REDIS_BROKER_DB = 1
REDIS_RESULT_DB = 2


@dataclass
class CeleryService:
    """A broker and result backend, and the Celery settings both sides use."""

    name: str
    broker_url: str
    result_backend: str
    #: Celery settings (key prefixes) for the caller's app_config and the workers' config module
    settings: dict[str, Any]
    folder: Path

    def executor_config(self, **extra: Any) -> dict[str, Any]:
        """``executor_config`` for the celery executor on this service."""
        return {"broker_url": self.broker_url, "result_backend": self.result_backend,
                "app_config": dict(self.settings), **extra}

    def config_module(self, name: str) -> str:
        """Write a Celery config module with :attr:`settings` into :attr:`folder`; return its name."""
        module = f"celeryconfig_{name}"
        lines = [f"{key} = {value!r}" for key, value in self.settings.items()]
        (self.folder / f"{module}.py").write_text("\n".join(lines) + "\n")
        return module


@dataclass
class CeleryWorker:
    """A ``celery worker`` subprocess consuming one queue."""

    service: CeleryService
    queue: str
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def executor_config(self, **extra: Any) -> dict[str, Any]:
        return self.service.executor_config(queue=self.queue, **extra)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # warm shutdown
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started it dies (Linux), so a
    killed test or bench run leaves no worker behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def start_worker(service: CeleryService, *, python: str = sys.executable, app: str = "wove_executor_celery.worker",
                 pool: str = "prefork", concurrency: int = 2, extra_path: str | None = None,
                 queue_name: str | None = None, env: dict[str, str] | None = None,
                 startup_timeout: float = 60.0) -> CeleryWorker:
    """Start ``python -m celery -A app worker`` on ``queue_name`` (default: a fresh queue) and
    wait until it is ready."""
    name = uuid.uuid4().hex[:10]
    worker_queue = queue_name or f"wove-test-{name}"
    path = [str(service.folder), *([extra_path] if extra_path else []), os.environ.get("PYTHONPATH", "")]
    worker_env = {
        **os.environ,
        "CELERY_BROKER_URL": service.broker_url,
        "CELERY_RESULT_BACKEND": service.result_backend,
        "CELERY_CONFIG_MODULE": service.config_module(name),
        "PYTHONPATH": os.pathsep.join(p for p in path if p),
        **(env or {}),
    }
    command = [python, "-m", "celery", "-A", app, "worker", "-Q", worker_queue, "-P", pool, "-c", str(concurrency),
               "-n", f"wove-{name}@127.0.0.1", "--without-gossip", "--without-mingle", "-l", "INFO"]
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=worker_env, start_new_session=True,
                            preexec_fn=_die_with_parent)
    worker = CeleryWorker(service, worker_queue, proc)
    ready: queue.Queue[bool] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            worker.lines.append(line)
            if re.search(r"\bready\.", line):
                ready.put(True)
        ready.put(False)

    threading.Thread(target=pump, daemon=True).start()
    try:
        ok = ready.get(timeout=startup_timeout)
    except queue.Empty:
        ok = False
    if not ok:
        worker.stop()
        raise RuntimeError(f"`{' '.join(command)}` did not get ready within {startup_timeout}s:\n{worker.output[-4000:]}")
    return worker


@pytest.fixture(scope="session")
def session_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("celery")


@pytest.fixture(scope="session")
def redis_celery(redis_service: tuple[str, int], session_folder: Path) -> Iterator[CeleryService]:
    """Redis as broker (database 1) and result backend (database 2), keys under a session prefix."""
    import redis

    host, port = redis_service
    prefix = f"wove-test-{uuid.uuid4().hex[:12]}:"
    settings = {"broker_transport_options": {"global_keyprefix": prefix},
                "result_backend_transport_options": {"global_keyprefix": prefix}}
    yield CeleryService("redis", f"redis://{host}:{port}/{REDIS_BROKER_DB}", f"redis://{host}:{port}/{REDIS_RESULT_DB}",
                        settings, session_folder)
    for db in (REDIS_BROKER_DB, REDIS_RESULT_DB):
        client = redis.Redis(host=host, port=port, db=db)
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start:start + 500])
        client.close()


def _rabbitmqctl(*args: str) -> None:
    result = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {result.stdout}{result.stderr}")


@pytest.fixture(scope="session")
def rabbit_celery(rabbitmq_service: tuple[str, int], session_folder: Path) -> Iterator[CeleryService]:
    """RabbitMQ as broker, in a vhost of its own (deleted afterwards), results over ``rpc://``."""
    if shutil.which("rabbitmqctl") is None:
        message = "rabbitmqctl is not on PATH (it creates the test's own vhost); install rabbitmq-server"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    host, port = rabbitmq_service
    vhost = f"wove-test-{uuid.uuid4().hex[:12]}"
    _rabbitmqctl("add_vhost", vhost)
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield CeleryService("rabbitmq", f"amqp://guest:guest@{host}:{port}/{vhost}", "rpc://", {}, session_folder)
    finally:
        _rabbitmqctl("delete_vhost", vhost)


@pytest.fixture(scope="session")
def rabbit_redis_celery(rabbit_celery: CeleryService, redis_celery: CeleryService) -> CeleryService:
    """RabbitMQ as broker (the session's vhost), Redis as result backend (database 2, session prefix)."""
    settings = {"result_backend_transport_options": redis_celery.settings["result_backend_transport_options"]}
    return CeleryService("rabbitmq-redis", rabbit_celery.broker_url, redis_celery.result_backend, settings,
                         rabbit_celery.folder)


@pytest.fixture(scope="session")
def redis_worker(redis_celery: CeleryService) -> Iterator[CeleryWorker]:
    """A prefork worker (4 pool processes) on Redis."""
    worker = start_worker(redis_celery, concurrency=4)
    yield worker
    worker.stop()


@pytest.fixture(scope="session")
def rabbit_worker(rabbit_celery: CeleryService) -> Iterator[CeleryWorker]:
    """A prefork worker (3 pool processes) on RabbitMQ with rpc:// results."""
    worker = start_worker(rabbit_celery, concurrency=3)
    yield worker
    worker.stop()


@pytest.fixture(params=["redis", "rabbitmq"])
def worker(request: pytest.FixtureRequest) -> CeleryWorker:
    """Each of the two workers in turn."""
    return request.getfixturevalue(f"{'redis' if request.param == 'redis' else 'rabbit'}_worker")


@pytest.fixture(scope="session")
def celery_worker_factory() -> Any:
    """:func:`start_worker` (``start(service, pool=..., concurrency=..., python=..., app=...)``)."""
    return start_worker


ROOT = Path(__file__).resolve().parents[2]
WOVE2_CELERY_VENV = Path(os.environ.get(
    "WOVE2_CELERY_VENV", ROOT / ".cache" / f"wove2-celery-venv-{sys.version_info[0]}.{sys.version_info[1]}"))
_WOVE2_PACKAGES = ("wove==2.0.3", "cloudpickle", "celery[redis]>=5.3")


def _wove2_celery_healthy(python: Path) -> bool:
    if not python.exists():
        return False
    probe = subprocess.run([str(python), "-c", "import importlib.metadata as m, celery, cloudpickle; "
                                              "print(m.version('wove'))"], capture_output=True, text=True, timeout=60)
    return probe.returncode == 0 and probe.stdout.strip() == "2.0.3"


@pytest.fixture(scope="session")
def wove2_celery_python() -> Path:
    """A venv (cached under .cache/, git-ignored) with wove==2.0.3 and Celery: a Wove 2.x client or worker."""
    python = WOVE2_CELERY_VENV / "bin" / "python"
    if _wove2_celery_healthy(python):
        return python
    shutil.rmtree(WOVE2_CELERY_VENV, ignore_errors=True)
    WOVE2_CELERY_VENV.parent.mkdir(parents=True, exist_ok=True)
    uv = shutil.which("uv")
    if uv is not None:
        steps = [[uv, "venv", "--quiet", "--python", sys.executable, str(WOVE2_CELERY_VENV)],
                 [uv, "pip", "install", "--quiet", "--python", str(python), *_WOVE2_PACKAGES]]
    else:
        steps = [[sys.executable, "-m", "venv", str(WOVE2_CELERY_VENV)],
                 [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *_WOVE2_PACKAGES]]
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True, timeout=600,
                                env={k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"})
        if result.returncode != 0:
            pytest.fail(f"building the Wove 2.0.3 + Celery venv failed at {step}:\n{result.stdout}{result.stderr}")
    assert _wove2_celery_healthy(python), f"{python} has no working wove 2.0.3 + celery"
    return python
