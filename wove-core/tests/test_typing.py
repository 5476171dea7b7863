"""call, submit, map, starmap, call_with and the Client are typed: mypy checks the task's
arguments against the function and infers the result (it runs on deliberate mistakes)."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("mypy")

HEADER = textwrap.dedent("""
    from __future__ import annotations
    import concurrent.futures
    from wove.environment import Client, ExecutorRuntime, RunFuture, gather

    async def add(a: int, b: int) -> int:
        return a + b

    def shout(text: str) -> str:
        return text.upper()
""")

CORRECT = HEADER + textwrap.dedent("""
    async def main(runtime: ExecutorRuntime, client: Client) -> None:
        total: int = await runtime.call("env", add, 1, 2)
        loud: str = await runtime.call("env", shout, "hi")
        future: RunFuture[int] = runtime.submit("env", add, 1, b=2)
        same: int = await future
        both: list[int] = await gather(runtime.submit("env", add, 1, 2), future)
        async for item in runtime.map("env", shout, ["a", "b"]):
            item.lower()
        async for pair_sum in runtime.map("env", add, [1, 2], [3, 4]):
            pair_sum + 1
        async for maybe in runtime.map("env", shout, ["a"], return_exceptions=True):
            if not isinstance(maybe, BaseException):
                maybe.lower()
        timed: int = await runtime.call_with("env", add, (1, 2), delivery_timeout=5.0,
                                             delivery_cancel_mode="require_ack")
        inferred = await runtime.call_with("env", add, (1, 2), delivery_heartbeat_seconds=1.0)
        inferred + 1
        (await runtime.submit_with("env", shout, ("x",))).lower()
        sync_total: int = client.call("env", add, 1, 2)
        sync_future: concurrent.futures.Future[str] = client.submit("env", shout, "x")
        for word in client.map("env", shout, ["a"]):
            word.lower()
        print(total, loud, same, both, timed, sync_total, sync_future)
""")

# each line marked `# E` must be reported, and no other
MISTAKES = HEADER + textwrap.dedent("""
    async def main(runtime: ExecutorRuntime, client: Client) -> None:
        await runtime.call("env", add, 1, "2")  # E wrong argument type
        text: str = await runtime.call("env", add, 1, 2)  # E the result is an int
        await runtime.call("env", add, 1)  # E missing argument
        runtime.submit("env", shout, 3)  # E wrong argument type
        (await runtime.submit("env", add, 1, 2)).upper()  # E an int has no upper()
        async for item in runtime.map("env", shout, [1, 2]):  # E the items are ints
            pass
        async for result in runtime.map("env", add, [1], [2]):
            result.upper()  # E the results are ints
        await runtime.call_with("env", add, (1, 2), delivery_timeout="soon")  # E a str timeout
        await runtime.call_with("env", add, (1, 2), delivery_timout=1)  # E an unknown setting
        await runtime.call_with("env", add, (1, 2), delivery_cancel_mode="eventually")  # E not a mode
        (await runtime.call_with("env", add, (1, 2))).upper()  # E an int has no upper()
        client.call("env", add, "1", 2)  # E wrong argument type
        word: int = client.call("env", shout, "x")  # E the result is a str
        client.submit("env", add, 1, 2).result().upper()  # E an int has no upper()
        client.map("env", shout, [1])  # E the items are ints
""")


def run_mypy(tmp_path: Path, files: dict[str, str]) -> dict[str, set[int]]:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", "--hide-error-context", "--show-column-numbers",
         "--cache-dir", str(tmp_path / ".mypy_cache"), "--python-version", "3.10", *files],
        capture_output=True, text=True, timeout=180, cwd=tmp_path,
    )
    errors: dict[str, set[int]] = {name: set() for name in files}
    for line in out.stdout.splitlines():
        match = re.match(r"(\w+\.py):(\d+):\d+: error:", line)
        if match:
            errors[match.group(1)].add(int(match.group(2)))
    assert out.returncode in (0, 1), out.stdout + out.stderr
    return errors


@pytest.mark.timeout(240)
def test_mypy_reports_each_mistake_and_passes_correct_code(tmp_path: Path) -> None:
    errors = run_mypy(tmp_path, {"correct.py": CORRECT, "mistakes.py": MISTAKES})
    assert errors["correct.py"] == set(), f"correct code must type-check: lines {sorted(errors['correct.py'])}"
    expected = {number for number, line in enumerate(MISTAKES.splitlines(), 1) if "# E" in line}
    assert errors["mistakes.py"] == expected, (
        f"missed: {sorted(expected - errors['mistakes.py'])}, unexpected: {sorted(errors['mistakes.py'] - expected)}"
    )
