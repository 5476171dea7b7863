"""The cost of the observer hook (``wove.observe``): local and stdio throughput of this
build against the build without the hook, in one run.

    uv run --no-sync python bench/bench_observer.py [--tasks N] [--rounds N] [--baseline REF] [--head REF]

Both builds are ``git worktree`` checkouts made in a temporary directory and removed
afterwards: ``--baseline`` (default: the commit before the one that added
``wove-core/src/wove/observe.py``: the build without the hook) and ``--head`` (default
``HEAD``). A scenario runs with that build's ``wove-core`` and ``wove-executor-stdio``
sources first on ``PYTHONPATH`` (the stdio worker processes inherit it), so uncommitted
work in the checkout does not count. The hook's own cost is the comparison of the two
consecutive commits that added it (``--baseline 9115d61^ --head 1a623af``); the default
compares everything since. Each scenario runs in a fresh process; the builds alternate for
``--rounds`` rounds (background load hits both alike) and the best throughput of each is
kept.

Rows: ``baseline`` (no hook), ``hook, no observer`` (this build: the figure that must stay
within 3% of the baseline), and for information ``hook, no-op observer`` (an installed
observer whose methods do nothing) and ``wove-otel`` (``wove_otel.instrument()`` with the
SDK and a span processor that drops spans: the cost of real spans and metrics).

Two measures: tasks per CPU second of the caller and its worker processes (what the hook
costs, and steady on a machine other work is using) and tasks per second of wall time.

Workloads: ``local`` (no-op async calls awaited inline, 256 in flight: the hottest path),
``local frames`` (no-op sync calls through the in-process worker engine) and ``stdio``
(no-op async calls through one ``python -m wove_executor_stdio`` worker, 256 in flight).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = Path(__file__).resolve().parent / "_scenario_observer.py"
WORKLOADS = ("local", "local-frames", "stdio")
OBSERVERS = ("none", "noop", "otel")


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def default_baseline() -> str:
    added = git("log", "--diff-filter=A", "--format=%H", "--", "wove-core/src/wove/observe.py").splitlines()
    if not added:
        raise SystemExit("wove-core/src/wove/observe.py is not in the history; pass --baseline REF.")
    return f"{added[-1]}^"


def scenario(workload: str, count: int, observer: str, src: Path, *, baseline: bool) -> tuple[float, float]:
    env = dict(os.environ)
    # the build first on the path, for this process and its stdio workers
    env["PYTHONPATH"] = os.pathsep.join([str(src / "wove-core" / "src"), str(src / "wove-executor-stdio" / "src"),
                                         env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, str(SCENARIO), workload, str(count), observer], capture_output=True,
                         text=True, timeout=900, env=env, cwd=tempfile.gettempdir())
    if out.returncode != 0:
        raise RuntimeError(f"{workload}/{observer} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not result["wove_file"].startswith(str(src)):
        raise RuntimeError(f"the scenario imported wove from {result['wove_file']}, not from {src}")
    if baseline and result["observe_module"]:
        raise RuntimeError(f"the baseline build at {src} has wove.observe: pass a --baseline before the hook")
    return float(result["throughput"]), float(result["per_cpu_second"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=20000, help="calls per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; the best of each side is kept")
    parser.add_argument("--baseline", default=None, help="git ref of the build without the hook")
    parser.add_argument("--head", default="HEAD", help="git ref of the build with the hook (default HEAD)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help=f"comma-separated subset of {', '.join(WORKLOADS)}")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object too")
    args = parser.parse_args()
    baseline = args.baseline or default_baseline()
    commit = git("rev-parse", "--short", baseline)
    here = git("rev-parse", "--short", args.head)
    trees = {name: Path(tempfile.mkdtemp(prefix=f"wove-bench-{name}-")) for name in ("baseline", "head")}
    results: dict[str, dict[str, dict[str, float]]] = {}
    try:
        git("worktree", "add", "--detach", str(trees["baseline"]), baseline)
        git("worktree", "add", "--detach", str(trees["head"]), args.head)
        workloads = [w for w in WORKLOADS if w in args.workloads.split(",")]
        for workload in workloads:
            count = args.tasks
            best = {key: {"wall": 0.0, "cpu": 0.0} for key in ("baseline", *OBSERVERS)}
            for _ in range(args.rounds):
                for key, tree, observer in [("baseline", trees["baseline"], "none"),
                                            *((name, trees["head"], name) for name in OBSERVERS)]:
                    wall, cpu = scenario(workload, count, observer, tree, baseline=key == "baseline")
                    best[key]["wall"] = max(best[key]["wall"], wall)
                    best[key]["cpu"] = max(best[key]["cpu"], cpu)
            results[workload] = best
    finally:
        for tree in trees.values():
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
            shutil.rmtree(tree, ignore_errors=True)
    labels = {"baseline": f"baseline ({commit}, no hook)", "none": f"hook, no observer ({here})",
              "noop": "hook, no-op observer", "otel": "wove-otel + SDK (spans dropped)"}
    for measure, title in (("cpu", "tasks per CPU second (caller + worker processes)"),
                           ("wall", "tasks per second, wall clock")):
        print(f"\n{title}, best of {args.rounds} rounds (ratio to the baseline)")
        print(f"{'':38}" + "".join(f"{workload:>22}" for workload in results))
        for key, label in labels.items():
            cells = [f"{results[w][key][measure]:>12,.0f} ({results[w][key][measure] / results[w]['baseline'][measure]:.3f})"
                     for w in results]
            print(f"{label:38}" + "".join(f"{cell:>22}" for cell in cells))
    if args.json:
        print(json.dumps({"baseline": commit, "head": here, "results": results}))


if __name__ == "__main__":
    main()
