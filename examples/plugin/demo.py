"""Use the installed ``audited`` executor by name, like any built-in one.

Install the plugin first (from this folder: ``pip install .``, or from a checkout of
Wove: ``pip install ./wove-core ./examples/plugin``), then run ``python demo.py``.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from wove.environment import ExecutorRuntime


def greet(name: str) -> str:
    return f"hello, {name}"


async def main() -> None:
    log = Path("audit.jsonl")
    environments = {"audited": {"executor": "audited", "executor_config": {"log_file": str(log)}}}
    async with ExecutorRuntime(environments) as runtime:
        print(await runtime.call("audited", greet, "plugin"))                 # hello, plugin
        print([r async for r in runtime.map("audited", greet, ["a", "b"])])  # ['hello, a', 'hello, b']
    events = [json.loads(line)["event"] for line in log.read_text().splitlines()]
    print(f"{log} holds {len(events)} events: {events.count('run_task')} runs, "
          f"{events.count('task_result')} results")


if __name__ == "__main__":
    asyncio.run(main())
