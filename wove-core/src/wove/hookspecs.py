"""Hook specifications for Wove plugins.

A plugin is a module or object published under the ``wove.executors`` entry point
group whose functions are marked with :data:`wove.hookimpl`::

    # pyproject.toml
    [project.entry-points."wove.executors"]
    grpc = "wove_executor_grpc.plugin"

    # wove_executor_grpc/plugin.py
    from wove import hookimpl

    @hookimpl
    def wove_register_executors(register):
        register("grpc", GrpcEnvironmentExecutor)

Plugin modules must stay light: import the transport library in ``start()``.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

__all__ = ["hookimpl", "hookspec"]

PROJECT = "wove"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def wove_register_executors(register: Callable[..., None]) -> None:
    """Register executor factories by name.

    Called once per plugin when Wove first resolves an executor name or lists executors.

    Args:
        register: ``register(name, factory, *, aliases=(), description="")``. ``name``
            is the string users write as ``"executor"`` in an environment definition.
            ``factory`` is an :class:`~wove.environment.EnvironmentExecutor` subclass or a
            zero-argument callable returning a fresh, unstarted executor (never a shared
            instance: one executor is built per environment). ``aliases`` are further
            names for the same factory.
    """


@hookspec
def wove_worker_services(register: Callable[..., None]) -> None:
    """Register ``wove worker NAME`` subcommands that serve the worker engine.

    Called when the ``wove`` command builds its parser.

    Args:
        register: ``register(name, add_arguments, run, *, help="")``. ``add_arguments``
            receives the subcommand's :class:`argparse.ArgumentParser` (``--host``,
            ``--port``, ``--security`` and the engine's limits are already added);
            ``run`` receives the parsed :class:`argparse.Namespace` and returns an exit
            code. A service prints ``listening on <URL or host:port>`` when it is ready.
            Serve through :func:`wove.serve.run_service` and pass it ``service=...,
            metrics_port=args.metrics_port, metrics_host=args.metrics_host`` (the common
            ``--metrics-port`` / ``--metrics-host`` flags): otherwise those flags are
            accepted and have no effect for this service.
    """


@hookspec
def wove_demo_environments(register: Callable[..., None]) -> None:
    """Offer environments for ``wove demo``.

    Args:
        register: ``register(name, factory)`` where ``factory()`` returns an async
            context manager that starts whatever the environment needs on loopback
            (a worker service, a cluster) and yields the environment definition dict.
    """
