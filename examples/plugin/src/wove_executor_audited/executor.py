"""An executor that runs tasks in this process and appends one line per run to an audit log.

It builds on :class:`wove.environment.LocalEnvironmentExecutor` (a subclass gets every
call as frames, so ``send`` sees each ``run_task``) and declares its ``executor_config``
keys as a :class:`wove.options.OptionSpec`, so a misspelt key or a bad value fails when
the environment starts, with the same messages as the built-in executors.
"""

from __future__ import annotations

import json
import time
from typing import IO, Any

from wove.environment import LocalEnvironmentExecutor
from wove.local import LOCAL_OPTIONS
from wove.options import STR, Option

#: The ``audited`` executor's keys: the local executor's, and where the log goes.
AUDITED_OPTIONS = LOCAL_OPTIONS.extend("audited", [
    Option("log_file", STR, required=True, doc="file each run is appended to, one JSON line per event"),
])


class AuditedExecutor(LocalEnvironmentExecutor):
    """Runs tasks in process; appends ``{"run_id", "task_id", "event", "time"}`` lines to ``log_file``."""

    config_options = AUDITED_OPTIONS

    def __init__(self) -> None:
        super().__init__()
        self._log: IO[str] | None = None

    async def start(self, *, environment_name: str, environment_config: dict[str, Any],
                    run_config: dict[str, Any]) -> None:
        config = AUDITED_OPTIONS.validate(environment_config, environment=environment_name)
        local = {key: config[key] for key in LOCAL_OPTIONS.options if config[key] is not None}
        await super().start(environment_name=environment_name, environment_config=local, run_config=run_config)
        # a local file opened once per environment (not worth a thread); closed in stop()
        self._log = open(config["log_file"], "a", encoding="utf-8")  # noqa: SIM115, ASYNC230

    def _audit(self, frame: dict[str, Any], event: str) -> None:
        if self._log is not None:
            self._log.write(json.dumps({"run_id": frame.get("run_id"), "task_id": frame.get("task_id"),
                                        "event": event, "time": time.time()}) + "\n")
            self._log.flush()

    async def send(self, frame: dict[str, Any]) -> None:
        if frame["type"] in ("run_task", "cancel_task"):
            self._audit(frame, frame["type"])
        await super().send(frame)

    async def recv(self) -> dict[str, Any]:
        event = await super().recv()
        if event["type"] in ("task_result", "task_error", "task_cancelled"):
            self._audit(event, event["type"])
        return event

    async def stop(self) -> None:
        await super().stop()
        if self._log is not None:
            self._log.close()
            self._log = None
