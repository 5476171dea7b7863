"""Wove 2.x's worker entry points in the ``wove`` namespace, run by the distribution that provides them."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from .registry import install_hint


def run_provided(command: str, module: str, distribution: str, argv: Sequence[str] | None) -> int:
    """Run ``module.main(argv)``; without ``distribution`` installed, one line and exit status 2."""
    package = module.split(".", 1)[0]
    try:
        main = importlib.import_module(module).main
    except ImportError as exc:
        if exc.name != package:
            raise
        print(f"{command} needs {distribution}: {install_hint(distribution)}", file=sys.stderr)
        return 2
    return int(main(argv))
