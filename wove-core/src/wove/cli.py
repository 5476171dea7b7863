"""The ``wove`` command: ``wove executors``, ``wove demo``, ``wove worker NAME``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from .registry import get_registry

__all__ = ["announce_listening", "main"]

DEFAULT_MAX_BODY = 256 * 1024 * 1024


def announce_listening(where: str) -> None:
    """Print the ready line every worker service prints (``listening on <where>``)."""
    print(f"listening on {where}", flush=True)


def _cmd_executors(_: argparse.Namespace) -> int:
    registry = get_registry()
    rows: list[tuple[str, ...]] = [("executor", "distribution", "version", "plugin", "description")]
    for info in registry.executors():
        description = info.description if info.alias_of is None else f"alias of {info.alias_of}"
        rows.append((info.name, info.distribution, info.version, info.plugin, description))
    _print_table(rows)
    problems = [p for p in registry.plugins() if p.status not in ("loaded",)]
    for plugin in problems:
        print(f"plugin {plugin.name} ({plugin.distribution} {plugin.version}): {plugin.status}")
    return 0


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for index, row in enumerate(rows):
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
        if index == 0:
            print("  ".join("-" * width for width in widths))


def _demo_square(x: int) -> int:
    return x * x


async def _demo_noop() -> None:
    return None


async def _demo_one(name: str, factory: Callable[[], Any], tasks: int) -> tuple[str, ...]:
    from .runtime import ExecutorRuntime

    async with factory() as definition, ExecutorRuntime({name: definition}, {}) as runtime:
        results = await asyncio.gather(*(runtime.call(name, _demo_square, i) for i in range(tasks)))
        correct = sum(1 for i, value in enumerate(results) if value == i * i)
        latencies = []
        for _ in range(50):
            started = time.perf_counter()
            await runtime.call(name, _demo_noop)
            latencies.append(time.perf_counter() - started)
    median = statistics.median(latencies) * 1e6
    return (definition.get("executor", name), str(tasks), f"{correct}/{tasks}", f"{median:,.0f} µs")


def _cmd_demo(args: argparse.Namespace) -> int:
    registry = get_registry()
    registry.load_all()
    demos: dict[str, Callable[[], Any]] = {}

    def register(name: str, factory: Callable[[], Any]) -> None:
        demos[name] = factory

    registry.manager.hook.wove_demo_environments(register=register)
    selected = [n for n in sorted(demos, key=lambda n: (n != "local", n)) if not args.only or n in args.only]
    print(f"Running {args.tasks} tasks through each of: {', '.join(selected)} (workers on loopback)")
    rows: list[tuple[str, ...]] = [("executor", "tasks", "results correct", "median latency")]
    failed = False
    for name in selected:
        try:
            rows.append(asyncio.run(_demo_one(name, demos[name], args.tasks)))
            failed |= not rows[-1][2].startswith(f"{args.tasks}/")
        except Exception as exc:
            failed = True
            rows.append((name, str(args.tasks), f"FAILED: {type(exc).__name__}: {exc}", "-"))
    print()
    _print_table(rows)
    return 1 if failed else 0


def _add_worker_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    worker = sub.add_parser("worker", help="serve the worker engine over a transport")
    services = worker.add_subparsers(dest="service", metavar="SERVICE")
    registry = get_registry()
    registry.load_all()

    def register(name: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                 run: Callable[[argparse.Namespace], int], *, help: str = "") -> None:
        parser = services.add_parser(name, help=help)
        parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
        parser.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one (default 0)")
        parser.add_argument("--security", default=None,
                            help="'env:VAR' (signed with the secret in VAR) or 'none'")
        parser.add_argument("--max-concurrency", type=int, default=256, help="runs executing at once")
        parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY,
                            help=f"largest accepted command (default {DEFAULT_MAX_BODY})")
        add_arguments(parser)
        parser.set_defaults(handler=run)

    registry.manager.hook.wove_worker_services(register=register)
    worker.set_defaults(handler=lambda ns: (worker.print_help(), 2)[1])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wove", description="Run Python functions in named environments.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    executors = sub.add_parser("executors", help="list installed executors")
    executors.set_defaults(handler=_cmd_executors)
    demo = sub.add_parser("demo", help="run a small workload through every installed executor")
    demo.add_argument("--tasks", type=int, default=200)
    demo.add_argument("--only", type=lambda s: s.split(","), default=None, help="comma-separated executor names")
    demo.set_defaults(handler=_cmd_demo)
    _add_worker_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    return int(handler(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
