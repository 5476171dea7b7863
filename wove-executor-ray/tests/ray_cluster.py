"""Ray heads for the tests: ``ray start --head --block`` on 127.0.0.1, in a process group of
its own that dies with the test process.

Ray resolves 127.0.0.1 to the machine's network address unless
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (its single-node mode): set here before ``ray`` is
imported, so the head binds loopback only and this process connects to it there. And a
driver started by ``uv run`` (as the tests are) would make Ray ship the project as the
job's runtime env and start its workers with ``uv run`` in a fresh venv
(``RAY_ENABLE_UV_RUN_RUNTIME_ENV``): the head's workers already have this environment.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
# Ray >= 2.5x turns token authentication on for a new local cluster (writing ~/.ray/auth_token)
# and for any head started where that file exists: keep these loopback test clusters without it.
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

RAY = Path(sys.executable).with_name("ray")
#: seconds `ray start --head` may take on a busy machine
STARTUP_TIMEOUT = 120.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RayHead:
    """A Ray head started by a test (``ray start --head --block`` in its own process group)."""

    address: str
    proc: subprocess.Popen[bytes]
    temp_dir: Path
    log: Path

    def stop(self) -> None:
        """SIGTERM (Ray stops its processes), then SIGKILL the process group after a few seconds
        (Ray would drain for up to 30 s while a detached actor or a task is alive)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever is left of the group
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the test process dies (Linux), so a killed
    test run does not leave a Ray head behind (SIGTERM makes `ray start --block` stop Ray)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def start_ray_head(ray: Path = RAY, *, num_cpus: int = 2, client_server: bool = True) -> RayHead:
    """``ray start --head`` on 127.0.0.1 with free ports, no dashboard, a small object store.

    ``ray`` may be the CLI of another venv (its workers then run that venv's Python);
    ``client_server=False`` for a minimal ``ray`` without ``ray[client]`` (it starts none).

    Raises:
        RuntimeError: the head did not come up within :data:`STARTUP_TIMEOUT` (with its log).
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="wove-ray-"))
    log = temp_dir / "head.log"
    run_env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
               "RAY_AUTH_MODE": "disabled", "AUTOSCALER_METRIC_PORT": str(_free_port())}
    if ray != RAY:  # another venv: nothing of ours may leak into its workers
        for name in ("VIRTUAL_ENV", "PYTHONPATH"):
            run_env.pop(name, None)
    command = [str(ray), "start", "--head", "--port=0", "--node-ip-address", "127.0.0.1",
               "--num-cpus", str(num_cpus), "--include-dashboard=false", "--disable-usage-stats",
               "--temp-dir", str(temp_dir), "--dashboard-port", str(_free_port()),
               "--dashboard-agent-listen-port", str(_free_port()), "--object-store-memory", str(100 * 2**20),
               "--block"]
    if client_server:
        command += ["--ray-client-server-port", str(_free_port())]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=run_env, preexec_fn=_die_with_parent)
    head = RayHead(address="", proc=proc, temp_dir=temp_dir, log=log)
    current = temp_dir / "ray_current_cluster"
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        text = log.read_text(errors="replace")
        if "Ray runtime started" in text and current.exists() and current.read_text().strip():
            head.address = current.read_text().strip()
            return head
        if proc.poll() is not None or time.monotonic() > deadline:
            head.stop()
            raise RuntimeError(f"`{' '.join(command)}` did not start within {STARTUP_TIMEOUT:g}s "
                               f"(exit status {proc.returncode}):\n{text[-4000:]}")
        time.sleep(0.2)


#: Wove 2.x, with the Ray of this environment, in a venv of its own (cached, ignored by git).
WOVE2_VERSION = "2.0.3"
WOVE2_RAY_VENV = Path(__file__).resolve().parents[2] / ".cache" / (
    f"wove2-ray-venv-{sys.version_info[0]}.{sys.version_info[1]}")


def wove2_ray_healthy(python: Path, ray_version: str) -> bool:
    if not python.exists():
        return False
    probe = subprocess.run([str(python), "-c", "import importlib.metadata as m, ray, cloudpickle; "
                            "print(m.version('wove'), ray.__version__)"], capture_output=True, text=True, timeout=120)
    return probe.returncode == 0 and probe.stdout.split() == [WOVE2_VERSION, ray_version]
