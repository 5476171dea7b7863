"""The public module: names, lazy transport classes, light imports, exports."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import pytest

import wove
import wove.environment as environment

SEED_NAMES = [
    "BackendAdapterEnvironmentExecutor", "DeliveryOrphanedError", "DeliveryTimeoutError",
    "EnvironmentExecutionError", "EnvironmentExecutor", "ExecutorRuntime", "GrpcEnvironmentExecutor",
    "HttpEnvironmentExecutor", "LocalEnvironmentExecutor", "MissingDispatchFeatureError",
    "StdioEnvironmentExecutor", "WebSocketEnvironmentExecutor", "build_executor_from_name",
    "coerce_executor", "normalize_exception",
]


#: the calling API beyond the seed (docs/calling.md)
CALLING_NAMES = ["Client", "ClientExecutor", "MapIterator", "MapProgress", "RunFuture", "RunStream",
                 "StreamNotSupportedError", "as_completed", "gather"]


def test_all_is_complete_and_sorted() -> None:
    assert environment.__all__ == sorted(environment.__all__)
    assert sorted(SEED_NAMES + CALLING_NAMES) == environment.__all__
    assert wove.__all__ == sorted(wove.__all__)


def test_seed_signatures() -> None:
    contract = environment.EnvironmentExecutor
    assert contract.__abstractmethods__ == frozenset({"start", "send", "recv", "stop"})
    assert list(inspect.signature(contract.start).parameters) == ["self", "environment_name", "environment_config", "run_config"]
    assert list(inspect.signature(environment.ExecutorRuntime).parameters) == ["environment_definitions", "run_config"]
    run_task = inspect.signature(environment.ExecutorRuntime.run_task).parameters
    assert list(run_task) == ["self", "task_name", "task_func", "task_args", "task_info"]
    normalize = inspect.signature(environment.normalize_exception).parameters
    assert normalize["source"].default == "task" and normalize["retryable"].default is False
    error = environment.EnvironmentExecutionError({"kind": "K", "message": "m"})
    assert error.payload == {"kind": "K", "message": "m"} and str(error) == "m"
    for name in ("DeliveryTimeoutError", "DeliveryOrphanedError", "MissingDispatchFeatureError", "EnvironmentExecutionError"):
        assert issubclass(getattr(environment, name), RuntimeError)


def test_normalize_exception_payload() -> None:
    try:
        raise ValueError("bad value")
    except ValueError as exc:
        payload = environment.normalize_exception(exc, source="transport", retryable=True)
    assert payload["kind"] == "ValueError" and payload["message"] == "bad value"
    assert payload["retryable"] is True and payload["source"] == "transport"
    assert "Traceback" in payload["traceback"]


def test_missing_transport_class_names_its_distribution() -> None:
    code = (
        "import sys\n"
        "sys.modules['wove_executor_grpc'] = None\n"
        "try:\n"
        "    from wove.environment import GrpcEnvironmentExecutor\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "pip install wove-executor-grpc" in out.stdout


def test_importing_wove_imports_no_transport_library_nor_cloudpickle() -> None:
    code = (
        "import json, sys, wove, wove.environment, wove.protocol, wove.worker, wove.security, wove.registry\n"
        "wove.environment.build_executor_from_name('local')\n"
        "heavy = ('cloudpickle', 'httpx', 'grpc', 'websockets', 'uvicorn', 'distributed', 'aiohttp')\n"
        "print(json.dumps([m for m in heavy if m in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


def test_missing_cloudpickle_says_the_install_command() -> None:
    code = (
        "import sys\n"
        "sys.modules['cloudpickle'] = None\n"
        "from wove.protocol import encode_frame\n"
        "try:\n"
        "    encode_frame({'type': 'run_task', 'run_id': 't:1', 'task_id': 't', 'callable': len, 'args': {}})\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("MissingDispatchFeatureError")
    assert 'pip install "wove-core[dispatch]"' in out.stdout


@pytest.mark.parametrize("module", ["wove", "wove_executor_stdio", "wove_executor_http", "wove_executor_grpc", "wove_executor_ws", "wove_executor_dask"])
def test_py_typed_is_shipped(module: str) -> None:
    from importlib import resources

    try:
        files = resources.files(module)
    except ModuleNotFoundError:
        pytest.skip(f"{module} is not installed")
    assert (files / "py.typed").is_file()
