"""``python -m wove_otel.testing --spans DIR [--service-name NAME] -m MODULE [ARGS...]``."""

from __future__ import annotations

import argparse
import runpy
import sys

from . import configure


def main(argv: list[str] | None = None) -> None:
    """Configure span files under ``--spans``, then run ``-m MODULE`` as ``__main__``."""
    parser = argparse.ArgumentParser(prog="python -m wove_otel.testing",
                                     description="Run a module with its spans written to files (wove_otel.testing).")
    parser.add_argument("--spans", required=True, help="directory for spans-<pid>.jsonl and logs-<pid>.jsonl")
    parser.add_argument("--service-name", default="wove-worker", help="the service.name resource attribute")
    parser.add_argument("-m", dest="module", required=True,
                        help="the module to run, e.g. wove_executor_stdio; the arguments after it are its own")
    argv = list(sys.argv[1:] if argv is None else argv)
    # everything after "-m MODULE" belongs to the module, whatever it looks like
    cut = argv.index("-m") + 2 if "-m" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    configure(args.spans, args.service_name)
    sys.argv = [args.module, *argv[cut:]]
    runpy.run_module(args.module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
