"""Detect a script that starts the embedded LocalCluster without an ``if __name__ == "__main__":`` guard.

Dask starts the embedded cluster's worker processes with ``multiprocessing`` (method
``spawn`` by default), which imports the main script again in every worker process. A
script that starts the cluster at import time would then start another cluster in each
worker; Python refuses that in a storm of ``RuntimeError`` tracebacks. We detect the
situation before spawning anything and raise one error that says what to add.
"""

from __future__ import annotations

import ast
import sys
import threading
from pathlib import Path
from types import FrameType, ModuleType

__all__ = ["MainGuardError", "check_main_guard"]

#: multiprocessing start methods that import the main module again in the child.
REIMPORTING_METHODS = ("spawn", "forkserver")

_EXAMPLE = '''\
    import asyncio

    async def main():
        async with ExecutorRuntime(environments, run_config) as runtime:
            ...

    if __name__ == "__main__":
        asyncio.run(main())'''


class MainGuardError(RuntimeError):
    """The embedded LocalCluster would start worker processes that re-run the main script."""


def _is_main_test(test: ast.expr) -> bool:
    """True for ``__name__ == "__main__"`` (either order, possibly inside ``and``)."""
    for node in ast.walk(test):
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], ast.Eq):
            sides = [node.left, *node.comparators]
            names = [s for s in sides if isinstance(s, ast.Name) and s.id == "__name__"]
            mains = [s for s in sides if isinstance(s, ast.Constant) and s.value == "__main__"]
            if names and mains:
                return True
    return False


def _guarded_lines(source: str) -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.If) and _is_main_test(node.test) and node.body:
            ranges.append((node.body[0].lineno, node.body[-1].end_lineno or node.body[-1].lineno))
    return ranges


def _module_frame(main: ModuleType) -> FrameType | None:
    """The frame running the main module's top-level code (on any thread's stack), if any."""
    stacks: list[FrameType | None] = [sys._getframe()]
    main_thread = threading.main_thread().ident
    if main_thread is not None and main_thread != threading.get_ident():
        stacks.append(sys._current_frames().get(main_thread))
    for frame in stacks:
        while frame is not None:
            if frame.f_code.co_name == "<module>" and frame.f_globals is main.__dict__:
                return frame
            frame = frame.f_back
    return None


def _message(path: str, line: int | None, method: str, child: bool) -> str:
    where = f"{path}, line {line}" if line is not None else path
    what = ("this process is a worker process that multiprocessing started, and importing the main script "
            "again started the Wove runtime once more" if child else
            "this script starts the Wove runtime at import time (not under a main guard), so every worker "
            "process would start another cluster")
    return (
        f"dask executor: the embedded LocalCluster starts its worker processes with the {method!r} method, which "
        f"imports the main script {where} again in each of them; {what}. Put the code that starts the runtime "
        f"under an `if __name__ == \"__main__\":` guard:\n\n{_EXAMPLE}\n\n"
        "Or set executor_config.processes to false (worker threads in this process), or give "
        "executor_config.address of a running Dask scheduler."
    )


def check_main_guard(method: str) -> None:
    """Raise :class:`MainGuardError` when starting worker processes would re-run unguarded main code.

    Raises:
        MainGuardError: ``method`` re-imports the main module and either this process is
            such a re-import (a spawned child running the script's top level), or the
            main script is executing top-level code outside an ``if __name__ ==
            "__main__":`` block right now (the call came from there).
    """
    if method not in REIMPORTING_METHODS:
        return
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or not isinstance(path, str):
        return  # interactive, -c, or an embedded interpreter: children do not re-run anything
    if getattr(main, "__name__", None) == "__mp_main__":
        raise MainGuardError(_message(path, None, method, child=True))
    spec_name = getattr(getattr(main, "__spec__", None), "name", None)
    if isinstance(spec_name, str) and (spec_name == "__main__" or spec_name.endswith(".__main__")):
        return  # `python -m package`: multiprocessing does not run a package's __main__ again
    frame = _module_frame(main)
    if frame is None:
        return  # the main script finished its top level (or we run from elsewhere)
    line = frame.f_lineno
    try:
        ranges = _guarded_lines(Path(path).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return  # cannot tell: let multiprocessing decide
    if not any(start <= line <= end for start, end in ranges):
        raise MainGuardError(_message(path, line, method, child=False))
