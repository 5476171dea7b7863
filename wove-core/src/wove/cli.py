"""The ``wove`` command: ``wove executors``, ``wove demo``, ``wove worker NAME``.

Every ``wove worker`` service gets the same checks here, before its own runner starts:
``--security`` is parsed and its environment variable read (one parser:
:meth:`wove.security.NetworkExecutorSecurity.from_config`), certificate and key files
must exist, a non-loopback ``--host`` without security is refused unless
``--insecure`` is given, and metrics (``--metrics-port``, or a service's ``--metrics``)
need ``prometheus_client`` (``wove-core[metrics]``). A problem prints one line, ``wove worker NAME: <what, value,
fix>``, and exits 2. Ctrl-C exits 130 without a traceback (a worker that drains
gracefully exits 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import functools
import logging
import signal
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from . import serve
from .registry import (
    ENTRY_POINT_GROUP,
    KNOWN_DISTRIBUTIONS,
    KNOWN_SERVICES,
    get_registry,
    install_hint,
)
from .security import NetworkExecutorSecurity, is_local_host
from .session import DEFAULT_MAX_COMMAND_BYTES
from .worker import release_large_buffers

__all__ = ["announce_listening", "build_parser", "main"]

DEFAULT_MAX_BODY = DEFAULT_MAX_COMMAND_BYTES
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

SECURITY_HELP = (
    "how clients authenticate: 'env:VAR' or 'signed:env:VAR' (Wove 2.x signed requests, HMAC secret "
    "in the environment variable VAR), 'bearer:env:VAR' (Authorization: Bearer <token in VAR>), or "
    "'none' (default). Required on a non-loopback --host unless --insecure."
)

#: Flags (argparse dests) that name files a service reads at start: checked to exist first.
_FILE_DESTS = frozenset({"certfile", "keyfile", "ca_certs", "cafile", "ca_file", "client_ca", "client_ca_file"})

logger = logging.getLogger(__name__)
_announced = False
T = TypeVar("T")


def announce_listening(where: str) -> None:
    """Print the ready line every worker service prints (``listening on <where>``)."""
    global _announced
    _announced = True
    serve.announce_listening(where)


# -- wove executors -----------------------------------------------------------------
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
    for name, claims in registry.conflicts().items():
        who = " and ".join(f"plugin {c.plugin} ({c.distribution} {c.version})" for c in claims)
        print(f"executor name '{name}' is registered twice, by {who}: unusable until one is "
              f"uninstalled or disabled (WOVE_DISABLE_PLUGINS={claims[-1].plugin})")
    return 0


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for index, row in enumerate(rows):
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
        if index == 0:
            print("  ".join("-" * width for width in widths))


# -- wove demo ------------------------------------------------------------------------
def _demo_square(x: int) -> int:
    return x * x


async def _demo_noop() -> None:
    return None


async def _demo_one(name: str, factory: Callable[[], Any], tasks: int) -> tuple[str, ...]:
    from importlib.util import find_spec

    from .runtime import ExecutorRuntime

    # a progress bar on a terminal when tqdm (wove-core[progress]) is installed; nothing otherwise
    progress = find_spec("tqdm") is not None
    async with factory() as definition, ExecutorRuntime({name: definition}, {}) as runtime:
        results = [value async for value in runtime.map(name, _demo_square, range(tasks), progress=progress)]
        correct = sum(1 for i, value in enumerate(results) if value == i * i)
        latencies = []
        for _ in range(50):
            started = time.perf_counter()
            await runtime.call(name, _demo_noop)
            latencies.append(time.perf_counter() - started)
    median = statistics.median(latencies) * 1e6
    return (definition.get("executor", name), str(tasks), f"{correct}/{tasks}", f"{median:,.0f} µs")


def demo_environments() -> dict[str, Callable[[], Any]]:
    """The ``wove demo`` environments every loaded plugin offers (``wove_demo_environments``)."""
    registry = get_registry()
    registry.plugins()  # loads every allowed plugin without raising on name clashes
    demos: dict[str, Callable[[], Any]] = {}

    def register(name: str, factory: Callable[[], Any]) -> None:
        demos[name] = factory

    registry.manager.hook.wove_demo_environments(register=register)
    return demos


def _unknown_demo_message(unknown: list[str], demos: dict[str, Callable[[], Any]]) -> str:
    available = sorted(demos)
    message = (f"wove demo: --only names {', '.join(map(repr, unknown))}, for which no installed plugin "
               f"offers a demo; available: {', '.join(available) or '(none)'}.")
    for name in unknown:
        close = difflib.get_close_matches(name, available, n=1)
        if close:
            message += f" Did you mean '{close[0]}' (not {name!r})?"
        elif name in KNOWN_DISTRIBUTIONS:
            message += f" '{name}' is provided by {KNOWN_DISTRIBUTIONS[name]}: {install_hint(KNOWN_DISTRIBUTIONS[name])}"
    return message


def _cmd_demo(args: argparse.Namespace) -> int:
    demos = demo_environments()
    only = [name for name in (args.only or []) if name]
    if args.only is not None and not only:
        print(f"wove demo: --only needs comma-separated executor names, got {','.join(args.only)!r}; "
              f"available: {', '.join(sorted(demos))}.", file=sys.stderr)
        return EXIT_USAGE
    unknown = [name for name in only if name not in demos]
    if unknown:
        print(_unknown_demo_message(unknown, demos), file=sys.stderr)
        return EXIT_USAGE
    selected = [n for n in sorted(demos, key=lambda n: (n != "local", n)) if not only or n in only]
    print(f"Running {args.tasks} tasks through each of: {', '.join(selected)} (workers on loopback)")
    rows: list[tuple[str, ...]] = [("executor", "tasks", "results correct", "median latency")]
    failed = False
    for name in selected:
        try:
            rows.append(run_interruptibly(functools.partial(_demo_one, name, demos[name], args.tasks)))
            failed |= not rows[-1][2].startswith(f"{args.tasks}/")
        except Exception as exc:
            failed = True
            rows.append((name, str(args.tasks), f"FAILED: {type(exc).__name__}: {exc}", "-"))
    print()
    _print_table(rows)
    return 1 if failed else 0


def run_interruptibly(coro_factory: Callable[[], Awaitable[T]]) -> T:
    """``asyncio.run(coro_factory())`` where Ctrl-C raises :class:`KeyboardInterrupt`, always.

    The first SIGINT cancels the main task and lets the event loop shut down cleanly (no
    traceback from a half-closed loop at exit); whatever the cancelled code turns the
    cancellation into, the interrupt is what the caller sees. A second SIGINT raises at once.
    """
    interrupted = False

    async def guarded() -> T:
        nonlocal interrupted
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()

        def on_sigint() -> None:
            nonlocal interrupted
            if interrupted or task is None:
                raise KeyboardInterrupt
            interrupted = True
            task.cancel()

        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # Windows, not the main thread
            loop.add_signal_handler(signal.SIGINT, on_sigint)
        return await coro_factory()

    try:
        result = asyncio.run(guarded())
    except BaseException:
        if interrupted:
            raise KeyboardInterrupt from None
        raise
    if interrupted:
        raise KeyboardInterrupt
    return result


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a port number from 0 to 65535, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 0 to 65535, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


# -- wove worker ------------------------------------------------------------------------
class _WorkerSetupError(Exception):
    """One line for stderr: what was wrong, the value, the fix."""


def check_worker_args(service: str, parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The checks every ``wove worker`` service shares; returns warnings to print.

    Raises:
        _WorkerSetupError: a bad ``--security``, an unset variable, a missing file, or an
            exposed address without authentication.
    """
    warnings: list[str] = []
    raw = getattr(args, "security", None)
    try:
        security = NetworkExecutorSecurity.from_config(raw).resolve()
    except (ValueError, TypeError, RuntimeError) as exc:
        raise _WorkerSetupError(f"--security {raw!r}: {exc}") from None
    options = {action.dest: action for action in parser._actions}
    for dest in sorted(_FILE_DESTS & set(options)):
        value = getattr(args, dest, None)
        if value is None:
            continue
        flag = options[dest].option_strings[-1] if options[dest].option_strings else dest
        path = Path(value)
        if not path.is_file():
            problem = "is a directory" if path.is_dir() else "does not exist"
            raise _WorkerSetupError(
                f"{flag} {value!r}: the file {problem} (looked for {path.resolve()}). "
                f"Pass the path of an existing PEM file."
            )
        try:
            with path.open("rb") as file:
                head = file.read(1 << 20)
        except OSError as exc:
            raise _WorkerSetupError(f"{flag} {value!r}: cannot read the file ({exc.strerror}). Fix its permissions.") from None
        if b"-----BEGIN " not in head:
            raise _WorkerSetupError(
                f"{flag} {value!r}: not a PEM file (no '-----BEGIN ...-----' line). Pass a PEM file "
                f"(convert DER with: openssl x509 -inform der -in FILE -out FILE.pem)."
            )
    host = getattr(args, "host", "127.0.0.1")
    _check_metrics_args(args)
    if not is_local_host(host):
        if security.mode == "none":
            if not getattr(args, "insecure", False):
                raise _WorkerSetupError(
                    f"refusing to serve on --host {host} without authentication: anyone who can reach "
                    f"it could run code on this machine. Pass --security env:VAR (signed; or "
                    f"bearer:env:VAR), bind --host 127.0.0.1, or add --insecure to serve "
                    f"unauthenticated anyway (trusted networks and development only)."
                )
            warnings.append(
                f"WARNING: serving on {host} without authentication (--insecure): anyone who can "
                f"reach it can run code on this machine. Use --security env:VAR outside development."
            )
        elif security.mode == "bearer" and "certfile" in options and not getattr(args, "certfile", None):
            warnings.append(
                f"WARNING: bearer tokens travel in clear text on {host} without TLS; add --certfile/--keyfile "
                f"(or use signed requests: --security env:VAR)."
            )
    return warnings


def _check_metrics_args(args: argparse.Namespace) -> None:
    """``--metrics-port`` / ``--metrics-host`` / ``--metrics``; fills ``metrics_host`` (default ``--host``)."""
    port = getattr(args, "metrics_port", None)
    if getattr(args, "metrics_host", None) is not None and port is None:
        raise _WorkerSetupError(f"--metrics-host {args.metrics_host!r} needs --metrics-port PORT (the port to serve "
                                "metrics on; 0 picks a free one).")
    if port is not None and port != 0 and port == getattr(args, "port", None):
        raise _WorkerSetupError(f"--metrics-port {port} is also the service's --port; give metrics a port of "
                                "their own (or, for http, use --metrics to serve /metrics on --port).")
    if port is not None or getattr(args, "metrics", False):
        from .metrics import ensure_available

        try:
            ensure_available()
        except ImportError as exc:
            raise _WorkerSetupError(str(exc)) from None
    if hasattr(args, "metrics_host") and args.metrics_host is None:
        args.metrics_host = getattr(args, "host", "127.0.0.1")


def _worker_runner(service: str, parser: argparse.ArgumentParser,
                   run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    label = f"wove worker {service}"

    def checked_run(args: argparse.Namespace) -> int:
        try:
            warnings = check_worker_args(service, parser, args)
        except _WorkerSetupError as exc:
            print(f"{label}: {exc}", file=sys.stderr)
            return EXIT_USAGE
        for warning in warnings:
            print(f"{label}: {warning}", file=sys.stderr, flush=True)
        release_large_buffers()  # a worker process: freed result buffers go back to the system
        try:
            return int(run(args) or 0)
        except KeyboardInterrupt:
            raise
        except (OSError, ValueError, TypeError, RuntimeError, ImportError) as exc:
            # a bind failure, an unreadable certificate, ... : one line, not a traceback
            if getattr(args, "verbose", 0):
                logger.exception("%s failed", label)
            more = "" if getattr(args, "verbose", 0) else " (run with -v for the traceback)"
            import ssl

            hint = ""
            if isinstance(exc, ssl.SSLError):
                files = [f"{action.option_strings[-1]} {getattr(args, action.dest)!r}" for action in parser._actions
                         if action.dest in _FILE_DESTS and action.option_strings and getattr(args, action.dest, None)]
                hint = f"; check that {', '.join(files) or 'the TLS files'} hold a matching certificate and key"
            print(f"{label}: {type(exc).__name__}: {exc}{hint}{more}", file=sys.stderr)
            return 1 if _announced else EXIT_USAGE

    return checked_run


def _missing_service(service: str, distribution: str) -> Callable[[argparse.Namespace], int]:
    def explain(_: argparse.Namespace) -> int:
        try:
            installed: str | None = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            installed = None
        if installed is None:
            fix = f"It is provided by {distribution}: {install_hint(distribution)}"
        else:
            statuses = [f"plugin {p.name}: {p.status}" for p in get_registry().plugins() if p.distribution == distribution]
            fix = (f"{distribution} {installed} is installed but its plugin is not loaded "
                   f"({'; '.join(statuses) or 'no wove.executors entry point'}); check WOVE_DISABLE_PLUGINS / "
                   f"WOVE_LOAD_PLUGINS.")
        print(f"wove worker {service}: no installed plugin provides the '{service}' worker service. {fix}",
              file=sys.stderr)
        return EXIT_USAGE

    explain.missing_service = True  # type: ignore[attr-defined]
    return explain


def _add_worker_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    worker = sub.add_parser("worker", help="serve the worker engine over a transport", parents=[common])
    services = worker.add_subparsers(dest="service", metavar="SERVICE")
    registry = get_registry()
    registry.plugins()  # loads every allowed plugin without raising on executor name clashes
    provided: set[str] = set()

    def register(name: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                 run: Callable[[argparse.Namespace], int], *, help: str = "") -> None:
        parser = services.add_parser(name, help=help, parents=[common])
        parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
        parser.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one (default 0)")
        parser.add_argument("--security", default=None, help=SECURITY_HELP)
        parser.add_argument("--insecure", action="store_true",
                            help="allow a non-loopback --host without --security (warns on every start)")
        parser.add_argument("--max-concurrency", type=int, default=256, help="runs executing at once")
        parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY,
                            help=f"largest accepted command (default {DEFAULT_MAX_BODY})")
        parser.add_argument("--grace", type=float, default=serve.DEFAULT_GRACE,
                            help="on SIGTERM/SIGINT, seconds runs in flight may take to finish before the rest "
                            f"are ended (default {serve.DEFAULT_GRACE:g}); a second signal exits at once")
        parser.add_argument("--allow-remote-shutdown", action="store_true",
                            help="obey 'shutdown' commands from clients (off: the service is shared)")
        parser.add_argument("--metrics-port", type=_port, default=None, metavar="PORT",
                            help="serve Prometheus metrics at http://HOST:PORT/metrics (0 picks a free port; "
                            "printed as 'metrics on URL' after the ready line); needs wove-core[metrics]")
        parser.add_argument("--metrics-host", default=None, metavar="HOST",
                            help="interface for --metrics-port (default: --host)")
        add_arguments(parser)
        parser.set_defaults(handler=_worker_runner(name, parser, run))
        provided.add(name)

    registry.manager.hook.wove_worker_services(register=register)
    for name, distribution in sorted(KNOWN_SERVICES.items()):
        if name not in provided:
            placeholder = services.add_parser(name, help=f"(not installed: {install_hint(distribution)})",
                                              parents=[common])
            placeholder.set_defaults(handler=_missing_service(name, distribution))
    worker.set_defaults(handler=lambda ns: (worker.print_help(), EXIT_USAGE)[1])


# -- the command ------------------------------------------------------------------------
def version_text() -> str:
    """``wove --version``: wove-core's version, then each installed plugin distribution's."""
    lines = [f"wove-core {_version('wove-core')}"]
    seen: set[str] = {"wove-core"}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        name = dist.metadata["Name"] if dist is not None else None
        if name and name not in seen:
            seen.add(name)
            lines.append(f"{name} {dist.version if dist is not None else '?'}")
    return "\n".join([lines[0], *sorted(lines[1:])])


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "(not installed)"


class _VersionAction(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: Any = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        print(version_text())
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    # -v/--verbose is accepted before and after the subcommand; SUPPRESS keeps a
    # subcommand's default from overwriting a count given earlier.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="more logging (-vv for debug)")
    parser = argparse.ArgumentParser(prog="wove", description="Run Python functions in named environments.",
                                     parents=[common])
    parser.add_argument("--version", action=_VersionAction,
                        help="print the version of wove-core and of the installed executor distributions")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    executors = sub.add_parser("executors", help="list installed executors", parents=[common])
    executors.set_defaults(handler=_cmd_executors)
    demo = sub.add_parser("demo", help="run a small workload through every installed executor", parents=[common])
    demo.add_argument("--tasks", type=_positive_int, default=200, help="tasks per executor (default 200)")
    demo.add_argument("--only", type=lambda s: s.split(","), default=None, help="comma-separated executor names")
    demo.set_defaults(handler=_cmd_demo)
    _add_worker_commands(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``wove`` command; returns its exit status (130 after Ctrl-C)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # Quiet from here on: a second Ctrl-C ends the process at once, and objects torn
        # down half-way by the interrupt do not print "Exception ignored" tracebacks at exit.
        with contextlib.suppress(ValueError):  # not the main thread
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        sys.unraisablehook = lambda _unraisable: None
        print("", file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    handler = getattr(args, "handler", None)
    if extra and not getattr(handler, "missing_service", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    verbose = getattr(args, "verbose", 0)
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if handler is None:
        parser.print_help()
        return EXIT_USAGE
    return int(handler(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    # Run through the importable module, so that services importing ``wove.cli`` share its state.
    from wove.cli import main as _entry

    sys.exit(_entry())
