"""``executor_config`` validation: one declarative spec per executor, one validator.

Each executor declares its keys once, as an :class:`OptionSpec` of :class:`Option`
entries (name, :class:`Kind` = what a valid value is, default, doc, older aliases), and
calls :meth:`OptionSpec.validate` first thing in ``start()``::

    from wove.options import POSITIVE_INT, REDELIVERY_OPTIONS, STR, Option, OptionSpec

    OPTIONS = OptionSpec("grpc", [
        Option("target", STR, doc="host:port of the worker service", required=True),
        Option("max_message_bytes", POSITIVE_INT, 64 * 2**20, "largest message"),
        REDELIVERY_OPTIONS,                     # groups nest: their keys are known too
    ])

    class GrpcEnvironmentExecutor(FrameExecutor):
        config_options = OPTIONS                # the contract attribute (see EnvironmentExecutor)

        async def start(self, *, environment_name, environment_config, run_config):
            config = OPTIONS.validate(environment_config, environment=environment_name)
            self._target = config["target"]     # every key present: value or default

:meth:`OptionSpec.validate` raises :class:`~wove.errors.ConfigError`:

* for a key the spec does not know, naming the key, a did-you-mean (:mod:`difflib`)
  and the known keys;
* for a bad value, naming the key, the value received and what is expected;
* for a required key that is missing, and for a key set together with its alias.

A value of ``None`` counts as not set (the default applies). Aliases are older
spellings: the returned dict holds the value under the current name.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

__all__ = [
    "ANY",
    "BOOL",
    "CALLBACK_OPTIONS",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_PAYLOAD_WARNING_BYTES",
    "DICT",
    "INVALID",
    "NON_NEGATIVE_INT",
    "NON_NEGATIVE_SECONDS",
    "PAYLOAD_OPTIONS",
    "POSITIVE_INT",
    "POSITIVE_SECONDS",
    "REDELIVERY_OPTIONS",
    "STR",
    "STR_MAP",
    "Kind",
    "Option",
    "OptionSpec",
    "instance_of",
    "one_of",
    "path_of_directory",
    "where",
]


class Kind:
    """What a valid value is: a phrase for messages and a check.

    Args:
        expected: completes "must be …" in a message: ``"a positive integer"``.
        check: returns the value to use (the value itself, or a normalized one). It
            returns :data:`INVALID` or raises ``ValueError``/``TypeError`` when the
            value is wrong; a non-empty message is added to the error as the detail
            ("item 3 is an int").
    """

    __slots__ = ("check", "expected")

    def __init__(self, expected: str, check: Callable[[Any], Any]) -> None:
        self.expected = expected
        self.check = check

    @classmethod
    def predicate(cls, expected: str, test: Callable[[Any], bool]) -> Kind:
        """A kind whose valid values pass ``test`` (and are used unchanged)."""
        return cls(expected, lambda value: value if test(value) else INVALID)

    def __repr__(self) -> str:
        return f"Kind({self.expected!r})"


#: Returned by a check for an invalid value (when it has no detail to add).
INVALID: Any = object()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _str_map(value: Any) -> Any:
    if not isinstance(value, Mapping):
        return INVALID
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, str):
            raise ValueError(f"{key!r} maps to {type(item).__name__} {item!r}; convert the value with str()")
    return dict(value)


ANY = Kind("any value", lambda value: value)
BOOL = Kind.predicate("true or false", lambda value: isinstance(value, bool))
STR = Kind.predicate("a string", lambda value: isinstance(value, str))
DICT = Kind.predicate("a dict (a TOML table)", lambda value: isinstance(value, Mapping))
STR_MAP = Kind("a dict of strings to strings", _str_map)
POSITIVE_INT = Kind.predicate("a positive integer", lambda value: _is_int(value) and value >= 1)
NON_NEGATIVE_INT = Kind.predicate("a non-negative integer", lambda value: _is_int(value) and value >= 0)
POSITIVE_SECONDS = Kind.predicate("a positive number of seconds", lambda value: _is_number(value) and value > 0)
NON_NEGATIVE_SECONDS = Kind.predicate("a non-negative number of seconds",
                                      lambda value: _is_number(value) and value >= 0)


def one_of(*choices: Any) -> Kind:
    """A kind for a value among ``choices``."""
    return Kind.predicate(f"one of {', '.join(map(repr, choices))}", lambda value: value in choices)


def instance_of(*types: type, expected: str | None = None) -> Kind:
    """A kind for instances of ``types`` (``bool`` is not an ``int`` here)."""
    phrase = expected or " or ".join(f"a {t.__name__}" for t in types)
    return Kind.predicate(phrase, lambda value: isinstance(value, types)
                          and (bool in types or not isinstance(value, bool)))


def path_of_directory() -> Kind:
    """A kind for the path of an existing directory (returned as ``str``)."""
    def check(value: Any) -> Any:
        if not isinstance(value, (str, os.PathLike)):
            return INVALID
        path = os.fspath(value)
        if not os.path.isdir(path):
            raise ValueError("it is not an existing directory")
        return path
    return Kind("the path of an existing directory", check)


@dataclass(frozen=True)
class Option:
    """One ``executor_config`` key.

    Attributes:
        name: the key.
        kind: what a valid value is.
        default: the value when the key is absent or None.
        doc: one line for ``wove`` help and the docs.
        aliases: older spellings accepted for the key.
        required: the key must be set.
    """

    name: str
    kind: Kind = ANY
    default: Any = None
    doc: str = ""
    aliases: tuple[str, ...] = ()
    required: bool = False


def where(environment: str | None) -> str:
    """The message prefix for ``environment``: ``"Environment 'x': "`` (or nothing)."""
    return f"Environment '{environment}': " if environment else ""


class OptionSpec:
    """The ``executor_config`` keys of one executor (or a group of keys to include).

    Args:
        executor: the executor's name, for messages (``"stdio"``).
        options: :class:`Option` entries and :class:`OptionSpec` groups, whose keys
            are included (a later entry of the same name replaces an earlier one).
    """

    def __init__(self, executor: str, options: Iterable[Option | OptionSpec]) -> None:
        self.executor = executor
        merged: dict[str, Option] = {}
        for entry in options:
            for option in (entry.options.values() if isinstance(entry, OptionSpec) else (entry,)):
                merged.pop(option.name, None)
                merged[option.name] = option
        #: name → option
        self.options: dict[str, Option] = merged
        self._aliases: dict[str, str] = {}
        for option in merged.values():
            for alias in option.aliases:
                if alias in merged or alias in self._aliases:
                    raise ValueError(f"Option spec {executor!r}: alias {alias!r} of {option.name!r} is "
                                     "already a key or another key's alias.")
                self._aliases[alias] = option.name

    def __contains__(self, name: object) -> bool:
        return name in self.options or name in self._aliases

    def __iter__(self) -> Iterator[Option]:
        return iter(self.options.values())

    def __repr__(self) -> str:
        return f"OptionSpec({self.executor!r}, keys={sorted(self.options)})"

    def extend(self, executor: str, options: Iterable[Option | OptionSpec]) -> OptionSpec:
        """A new spec with these keys and ``options`` (for a derived executor)."""
        return OptionSpec(executor, [self, *options])

    def validate(self, config: Mapping[str, Any] | None, *, environment: str | None = None) -> dict[str, Any]:
        """Check ``config``; return every key's value (or default) under its current name.

        Raises:
            ConfigError: an unknown key (with a did-you-mean and the known keys), a bad
                value (the key, the value and what is expected), a missing required
                key, or a key set together with its alias.
        """
        prefix = where(environment) or f"{self.executor} executor: "
        if config is None:
            config = {}
        elif not isinstance(config, Mapping):
            raise ConfigError(f"{prefix}executor_config must be a table/dict of {self.executor} options, "
                              f"got {type(config).__name__} {config!r}.")
        unknown = [key for key in config if key not in self.options and key not in self._aliases]
        if unknown:
            raise ConfigError(prefix + self._unknown_message(unknown))
        given: dict[str, tuple[str, Any]] = {}
        for key, value in config.items():
            name = self._aliases.get(key, key)
            if name in given:
                alias = key if key != name else given[name][0]
                raise ConfigError(f"{prefix}executor_config sets both {name!r} and its older spelling {alias!r}; "
                                  f"keep only {name!r}.")
            given[name] = (key, value)
        values: dict[str, Any] = {}
        for name, option in self.options.items():
            key, value = given.get(name, (name, None))
            if value is None:
                if option.required:
                    raise ConfigError(f"{prefix}executor_config.{name} is required by the {self.executor} executor"
                                      f"{f' ({option.doc})' if option.doc else ''} and is not set.")
                values[name] = option.default
                continue
            values[name] = _checked(prefix, key, value, option.kind)
        return values

    def _unknown_message(self, unknown: list[str]) -> str:
        import difflib  # only on the error path: importing wove stays light

        names = sorted({*self.options, *self._aliases})
        parts = []
        for key in unknown:
            part = repr(key)
            match = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            if match:
                guess = match[0]
                current = self._aliases.get(guess)
                part += f" (did you mean {guess!r}{f', an older spelling of {current!r}' if current else ''}?)"
            parts.append(part)
        known = ", ".join(sorted(self.options)) or "(none)"
        what = (f"key {parts[0]} is not a {self.executor} executor option" if len(parts) == 1
                else f"keys {', '.join(parts)} are not {self.executor} executor options")
        return f"executor_config {what}. Known keys: {known}."

    def describe(self) -> str:
        """A Markdown table of the keys (key, expected value, default, doc)."""
        rows = ["| key | value | default | |", "|---|---|---|---|"]
        for option in self.options.values():
            default = "required" if option.required else ("" if option.default is None else f"`{option.default!r}`")
            aliases = f" (older: {', '.join(f'`{a}`' for a in option.aliases)})" if option.aliases else ""
            rows.append(f"| `{option.name}`{aliases} | {option.kind.expected} | {default} | {option.doc} |")
        return "\n".join(rows)


def _checked(prefix: str, key: str, value: Any, kind: Kind) -> Any:
    detail = ""
    try:
        result = kind.check(value)
    except (TypeError, ValueError) as exc:
        result, detail = INVALID, str(exc)
    if result is INVALID:
        raise ConfigError(f"{prefix}executor_config.{key} must be {kind.expected}, got {value!r}"
                          f"{f'; {detail}' if detail else ''}.")
    return result


#: The re-delivery keys every :class:`~wove.transport.FrameExecutor` reads
#: (:class:`~wove.transport.RedeliveryPolicy` applies the defaults).
REDELIVERY_OPTIONS = OptionSpec("re-delivery", [
    Option("max_deliveries", POSITIVE_INT, doc="transmissions of one requeue run, at most (default 3)"),
    Option("reconnect_timeout", NON_NEGATIVE_SECONDS, aliases=("ready_timeout",),
           doc="seconds a requeue run waits for an unreachable worker (default 30)"),
    Option("reconnect_initial_delay", NON_NEGATIVE_SECONDS, aliases=("retry_backoff",),
           doc="first back-off in seconds before a re-delivery, doubling (default 0.1)"),
    Option("reconnect_max_delay", NON_NEGATIVE_SECONDS, doc="largest back-off in seconds (default 5)"),
])

#: Largest command a client sends, by default: the worker services' own default limit
#: (``wove worker --max-body-bytes``, :data:`wove.session.DEFAULT_MAX_COMMAND_BYTES`).
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
#: Commands and results above this size log a warning naming the task and the size.
DEFAULT_PAYLOAD_WARNING_BYTES = 16 * 1024 * 1024

#: The frame-format and payload-size keys every transport executor reads
#: (:class:`~wove.transport.PayloadPolicy`; binary frames: docs/wire.md).
PAYLOAD_OPTIONS = OptionSpec("payload", [
    Option("binary_frames", BOOL, True,
           "send binary frames to a worker that offers them (false: always JSON frames, as Wove 2.x)"),
    Option("max_message_bytes", POSITIVE_INT, DEFAULT_MAX_MESSAGE_BYTES,
           "largest command sent, in bytes; a larger one fails before it is sent (PayloadTooLargeError)"),
    Option("payload_warning_bytes",
           Kind("a positive integer (bytes) or false", lambda v: v if v is False else POSITIVE_INT.check(v)),
           DEFAULT_PAYLOAD_WARNING_BYTES,
           "log a warning naming the task for a command or result larger than this (false: never)"),
])

#: The callback-server keys of :class:`~wove.backend.BackendAdapterEnvironmentExecutor`
#: (every engine adapter's spec includes them, with the re-delivery keys).
CALLBACK_OPTIONS = OptionSpec("backend callback", [
    Option("callback_host", STR, "127.0.0.1", "address the callback server binds"),
    Option("callback_port", NON_NEGATIVE_INT, 0, "port of the callback server (0: a free one)"),
    Option("callback_url", STR, doc="the URL workers use to reach the callback server, when not the bound one"),
    Option("callback_token", STR, doc="path token of the callback server (default: random)"),
    Option("callback_max_body_bytes", POSITIVE_INT, doc="largest callback request body"),
    Option("require_signed_callbacks", BOOL, True,
           "refuse callbacks not signed with the run's key (set false for Wove 2.x workers, which do not sign)"),
    Option("result_channel", one_of("auto", "callback", "engine"), "auto",
           "how the outcome comes back: auto (the callback, else the engine's own result), callback, engine"),
    Option("callback_tls_cert_file", STR, doc="certificate (PEM path) the callback server serves HTTPS with"),
    Option("callback_tls_key_file", STR, doc="its private key (PEM path; default: in the certificate file)"),
    Option("callback_tls_ca_file", STR,
           doc="CA (PEM path) workers verify the callback server with; it travels in each payload"),
    REDELIVERY_OPTIONS,
])
