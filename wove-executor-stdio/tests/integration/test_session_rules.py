"""The worker session's rules on the stdio worker, which one client owns (``exclusive``).

The network services run :class:`wove.testing.services.WorkerServiceContract`; the stdio
worker differs only where ownership does: its client's ``shutdown`` is obeyed, and when its
client goes away (end of input) the worker ends every run by orphan policy and exits.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from wove.protocol import decode_events, encode_frame
from wove.testing import tasks

pytestmark = pytest.mark.integration


def _worker(*args: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "wove_executor_stdio", "--grace", "3", *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    ready = decode_events(proc.stdout.readline())[0]
    assert "wove_stdio_ready" in ready
    return proc


def _send(proc: subprocess.Popen[bytes], frame: dict[str, Any]) -> None:
    assert proc.stdin is not None
    proc.stdin.write(encode_frame(frame) + b"\n")
    proc.stdin.flush()


def _run(run_id: str, func: Any, args: dict[str, Any], **delivery: Any) -> dict[str, Any]:
    return {"type": "run_task", "run_id": run_id, "task_id": run_id.split(":")[0], "callable": func,
            "args": args, "delivery": delivery}


def _terminals(out: bytes) -> dict[str, str]:
    events = [e for line in out.splitlines() if line.strip() for e in decode_events(line)]
    return {e["run_id"]: e["type"] for e in events if e["type"] in ("task_result", "task_error", "task_cancelled")}


def _wait_lines(path: Path, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_end_of_input_ends_runs_by_orphan_policy(tmp_path: Path) -> None:
    proc = _worker()
    markers = {policy: tmp_path / policy for policy in ("cancel", "fail", "detach")}
    for policy, marker in markers.items():
        _send(proc, _run(f"record:{policy}", tasks.record, {"path": str(marker), "seconds": 0.5},
                         delivery_orphan_policy=policy))
    time.sleep(0.2)
    out, _err = proc.communicate(timeout=30)  # closes stdin: the client went away
    assert proc.returncode == 0
    assert _terminals(out) == {"record:cancel": "task_cancelled", "record:fail": "task_error",
                               "record:detach": "task_result"}
    assert _wait_lines(markers["detach"], 1.0) == 1, "a detach run finishes within the grace period"
    assert not markers["cancel"].exists() and not markers["fail"].exists()


def test_its_clients_shutdown_command_is_obeyed() -> None:
    proc = _worker()
    _send(proc, _run("sleep:1", tasks.sleep, {"seconds": 10}, delivery_orphan_policy="cancel"))
    time.sleep(0.2)
    _send(proc, {"type": "shutdown"})
    assert proc.wait(timeout=15) == 0, "the worker one client owns stops when told"
    assert proc.stdout is not None
    assert _terminals(proc.stdout.read()) == {"sleep:1": "task_cancelled"}
    if proc.stdin:
        proc.stdin.close()


def test_sigterm_drains_runs_in_flight_and_exits_0() -> None:
    proc = _worker()
    for i in range(10):
        _send(proc, _run(f"sleep:{i}", tasks.sleep, {"seconds": 0.5}))
    _send(proc, _run("sleep:long", tasks.sleep, {"seconds": 30}))
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert proc.stdout is not None
    terminals = _terminals(proc.stdout.read())
    assert {terminals[f"sleep:{i}"] for i in range(10)} == {"task_result"}, terminals
    assert terminals["sleep:long"] == "task_cancelled", "a run past the grace ends with a terminal event"
    if proc.stdin:
        proc.stdin.close()


def test_malformed_lines_execute_nothing_and_the_worker_keeps_serving() -> None:
    proc = _worker()
    assert proc.stdin is not None and proc.stdout is not None
    for line in (b"not json", b"[1, 2]", b'{"type": "launch"}',
                 json.dumps({"type": "run_task", "run_id": "r:1", "task_id": "r", "callable_pickle": "!!",
                             "args_pickle": ""}).encode()):
        proc.stdin.write(line + b"\n")
    _send(proc, _run("add:1", tasks.add, {"a": 2, "b": 2}))
    out, _err = proc.communicate(timeout=30)
    terminals = _terminals(out)
    assert terminals == {"r:1": "task_error", "add:1": "task_result"}
