"""The wove command: listings, the demo, the checks every `wove worker` service shares, Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from wove.cli import build_parser, main
from wove.environment import ExecutorRuntime
from wove.testing import WorkerProcess

SERVICES = ["http", "grpc", "websocket"]


def wove(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The real command in a subprocess (what a user types)."""
    return subprocess.run([sys.executable, "-m", "wove.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def accepts_connections(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_for_stderr(worker: WorkerProcess, text: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while text not in worker.stderr and time.monotonic() < deadline:
        time.sleep(0.05)
    return worker.stderr


def test_executors_lists_name_distribution_and_version(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["executors"]) == 0
    out = capsys.readouterr().out
    assert any(line.split()[:2] == ["local", "wove-core"] for line in out.splitlines())


def test_demo_runs_local_and_prints_a_table(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["demo", "--only", "local", "--tasks", "50"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("local"))
    assert "50/50" in row and "µs" in row


def test_console_script_entry_point() -> None:
    out = subprocess.run([sys.executable, "-m", "wove.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "executors" in out.stdout and "worker" in out.stdout


def test_demo_with_an_unknown_name_says_what_is_available(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["demo", "--only", "lokal"]) == 2
    captured = capsys.readouterr()
    assert "Running" not in captured.out
    assert "'lokal'" in captured.err and "available: " in captured.err and "local" in captured.err
    assert "Did you mean 'local'" in captured.err
    assert main(["demo", "--only", ","]) == 2


def test_version_names_core_and_the_installed_executor_distributions() -> None:
    out = wove("--version")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"wove-core {metadata.version('wove-core')}"
    assert f"wove-executor-http {metadata.version('wove-executor-http')}" in lines[1:]


def test_verbose_works_before_and_after_the_subcommand() -> None:
    parser = build_parser()
    assert parser.parse_args(["-v", "executors"]).verbose == 1
    assert parser.parse_args(["executors", "-vv"]).verbose == 2
    assert parser.parse_args(["worker", "http", "--port", "0", "-v"]).verbose == 1
    assert parser.parse_args(["-v", "worker", "grpc"]).verbose == 1  # the subcommand's default does not reset it
    assert not hasattr(parser.parse_args(["executors"]), "verbose")
    out = wove("executors", "-v")
    assert out.returncode == 0, out.stderr


def test_a_typo_in_wove_disable_plugins_is_reported() -> None:
    out = wove("executors", env={"WOVE_DISABLE_PLUGINS": "htpp"})
    assert out.returncode == 0
    assert "WOVE_DISABLE_PLUGINS names plugin 'htpp'" in out.stderr
    assert "installed plugins: " in out.stderr and "http" in out.stderr and "Did you mean 'http'?" in out.stderr


def test_a_service_no_plugin_provides_names_its_distribution() -> None:
    out = wove("worker", "http", "--host", "0.0.0.0", env={"WOVE_LOAD_PLUGINS": "local"})
    assert out.returncode == 2
    assert "invalid choice" not in out.stderr
    assert out.stderr.startswith("wove worker http: no installed plugin provides the 'http' worker service.")
    assert "wove-executor-http" in out.stderr


# -- a worker on every interface ------------------------------------------------------
@pytest.mark.integration
@pytest.mark.parametrize("service", SERVICES)
def test_a_worker_on_all_interfaces_without_security_refuses_to_start(service: str) -> None:
    port = free_port()
    out = wove("worker", service, "--host", "0.0.0.0", "--port", str(port))
    assert out.returncode == 2, out.stdout + out.stderr
    assert "listening on" not in out.stdout
    message = out.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert message.startswith(f"wove worker {service}: ")
    assert "0.0.0.0" in message and "--security" in message and "--insecure" in message
    assert not accepts_connections(port)


@pytest.mark.integration
@pytest.mark.parametrize("service", SERVICES)
def test_insecure_starts_on_all_interfaces_and_warns(service: str) -> None:
    worker = WorkerProcess(service, "--host", "0.0.0.0", "--insecure")
    try:
        worker.start()
        assert worker.port and accepts_connections(worker.port)
        stderr = wait_for_stderr(worker, "WARNING")
        assert f"wove worker {service}: WARNING: serving on 0.0.0.0 without authentication (--insecure)" in stderr
    finally:
        worker.stop()
    assert worker.proc is not None and worker.proc.returncode == 0, worker.stderr


@pytest.mark.integration
@pytest.mark.parametrize("service", SERVICES)
def test_loopback_and_secured_workers_start_without_a_warning(service: str) -> None:
    worker = WorkerProcess(service, "--host", "0.0.0.0", "--security", "env:WOVE_CLI_TEST_SECRET",
                           env={"WOVE_CLI_TEST_SECRET": "s3cret"})
    with worker:
        assert worker.port
    assert "WARNING" not in worker.stderr and "s3cret" not in worker.stderr


# -- one line for a bad setting, on every service -------------------------------------
@pytest.mark.integration
@pytest.mark.parametrize("service", SERVICES)
@pytest.mark.parametrize("problem", ["bad-security", "unset-variable", "missing-certificate", "not-pem"])
def test_a_bad_setting_is_one_line_and_exit_2(service: str, problem: str, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-cert.pem"
    key = tmp_path / "key.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\nnot used\n-----END PRIVATE KEY-----\n")
    junk = tmp_path / "junk.pem"
    junk.write_text("this is not a certificate\n")
    args, expected = {
        "bad-security": (["--security", "secret123"], "--security 'secret123': security string must be"),
        "unset-variable": (["--security", "env:WOVE_CLI_TEST_UNSET"], "'WOVE_CLI_TEST_UNSET' is not set"),
        "missing-certificate": (["--certfile", str(missing), "--keyfile", str(key)],
                                f"--certfile '{missing}': the file does not exist"),
        "not-pem": (["--certfile", str(junk), "--keyfile", str(key)], f"--certfile '{junk}': not a PEM file"),
    }[problem]
    env = {k: v for k, v in os.environ.items() if k != "WOVE_CLI_TEST_UNSET"}
    out = subprocess.run([sys.executable, "-m", "wove.cli", "worker", service, *args], capture_output=True,
                         text=True, timeout=60, env=env)
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"wove worker {service}: ") and expected in lines[0], lines[0]
    assert "listening on" not in out.stdout


@pytest.mark.integration
def test_a_missing_http_client_ca_names_the_flag_and_the_path(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n")
    out = wove("worker", "http", "--certfile", str(cert), "--keyfile", str(cert), "--ca-certs", str(tmp_path / "ca.pem"))
    assert out.returncode == 2
    assert out.stderr.strip() == (f"wove worker http: --ca-certs '{tmp_path / 'ca.pem'}': the file does not exist "
                                  f"(looked for {tmp_path / 'ca.pem'}). Pass the path of an existing PEM file.")


# -- bearer and signed modes from the command line -------------------------------------
async def _call(url: str, security: Any) -> Any:
    definition = {"executor": "http", "executor_config": {"url": url, "security": security}}
    async with ExecutorRuntime({"w": definition}, {}) as runtime:
        return await asyncio.wait_for(runtime.call("w", pow, 2, 10), 30)


@pytest.mark.integration
@pytest.mark.parametrize(("flag", "good", "bad"), [
    ("bearer:env:WOVE_CLI_TEST_TOKEN", {"type": "bearer", "token_env": "WOVE_CLI_TEST_TOKEN"},
     {"type": "bearer", "token": "not-the-token"}),
    ("signed:env:WOVE_CLI_TEST_TOKEN", "env:WOVE_CLI_TEST_TOKEN", {"type": "signed", "secret": "not-the-secret"}),
])
def test_http_worker_serves_the_security_modes_a_client_uses(
        flag: str, good: Any, bad: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WOVE_CLI_TEST_TOKEN", "tok-7f3a")
    with WorkerProcess("http", "--security", flag, env={"WOVE_CLI_TEST_TOKEN": "tok-7f3a"}) as worker:
        assert asyncio.run(_call(worker.address, good)) == 1024
        with pytest.raises(Exception, match=r"\b403\b.*[Ii]nvalid") as info:
            asyncio.run(_call(worker.address, bad))
        assert "tok-7f3a" not in str(info.value)
        with pytest.raises(Exception, match=r"\b401\b.*[Mm]issing"):
            asyncio.run(_call(worker.address, "none"))


# -- Ctrl-C ---------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.parametrize("executor", ["local", "http"])
def test_ctrl_c_during_the_demo_exits_130_without_a_traceback(executor: str) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "wove.cli", "demo", "--only", executor, "--tasks", "50000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("Running 50000 tasks")
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        _out, err = proc.communicate(timeout=50)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


@pytest.mark.integration
@pytest.mark.parametrize("service", SERVICES)
def test_ctrl_c_stops_a_worker_quietly(service: str) -> None:
    worker = WorkerProcess(service)
    worker.start()
    try:
        assert worker.proc is not None
        worker.proc.send_signal(signal.SIGINT)
        worker.proc.wait(timeout=30)
    finally:
        worker.kill()
    assert worker.proc.returncode in (0, 130), worker.stderr
    assert "Traceback" not in worker.stderr
