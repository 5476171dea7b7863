"""SlurmAdapter: submits Wove payloads as Slurm batch jobs (``sbatch``), watches them
(``squeue``), cancels them (``scancel``).

Each run's payload goes to a file only its user can read (0600, in ``payload_dir``); the
job runs ``<command> <that file>`` (``python -m wove_executor_slurm.job`` by default),
which reads and removes it. Nothing of the payload is on the command line or in the
job's environment (Wove 2.x put it in ``$WOVE_BACKEND_PAYLOAD``, visible through
``squeue``/``scontrol`` and bounded in size). The job posts the run's events to the
callback server and prints its engine status to its output file, which the adapter reads
when the job ended and the callback did not bring the outcome.
"""

from __future__ import annotations

import asyncio
import getpass
import hashlib
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

from wove.backend import BackendAdapter
from wove.options import (
    CALLBACK_OPTIONS,
    INVALID,
    NON_NEGATIVE_SECONDS,
    POSITIVE_SECONDS,
    STR,
    Kind,
    Option,
    OptionSpec,
    path_of_directory,
)

from .job import parse_status

__all__ = [
    "DEFAULT_COMMAND",
    "SLURM_OPTIONS",
    "TERMINAL_STATES",
    "SlurmAdapter",
    "SlurmJob",
    "SlurmSubmission",
    "job_name",
]

logger = logging.getLogger(__name__)

#: What a job runs, followed by the payload file's path.
DEFAULT_COMMAND = "python -m wove_executor_slurm.job"
#: Slurm job states after which a job runs no more.
TERMINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL",
    "DEADLINE", "REVOKED", "SPECIAL_EXIT",
})
#: Seconds between two ``squeue`` calls.
DEFAULT_POLL_INTERVAL = 0.5
#: Seconds a job that ended waits for the worker's own terminal callback before the run is lost.
DEFAULT_LOSS_GRACE_SECONDS = 1.0
#: Seconds ``squeue`` may keep failing (the controller is down) before the pending runs are lost.
DEFAULT_CONTROLLER_TIMEOUT = 60.0
#: Seconds one sbatch / squeue / scancel call may take.
COMMAND_TIMEOUT = 60.0
#: Seconds a submitted job may be missing from ``squeue`` before it counts as lost.
MISSING_GRACE = 10.0
#: Job states for which a job with a key's name is still going (a duplicate joins it).
ACTIVE_STATES = "pending,running,configuring,completing,suspended,requeued,resizing"
_OWN_OPTIONS = ("--job-name", "-J", "--output", "-o", "--wrap")
_SAFE = re.compile(r"[^A-Za-z0-9._:@+=-]")


def _argv(value: Any) -> Any:
    if isinstance(value, str):
        value = shlex.split(value)
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
        return INVALID
    return list(value)


def _sbatch(value: Any) -> Any:
    argv = _argv(value)
    if argv is INVALID:
        return INVALID
    for item in argv[1:]:
        if item.split("=", 1)[0] in _OWN_OPTIONS or item.startswith(("-J", "-o")):
            raise ValueError(f"it may not set {item!r}: Wove sets the job name, output file and command itself "
                             "(use job_name_prefix and command)")
    if "--parsable" not in argv:
        argv.append("--parsable")
    return argv


ARGV = Kind("a command as a list of strings (or one string)", _argv)


def _submit(value: Any) -> Any:
    return value if callable(value) else INVALID


#: The slurm executor's ``executor_config`` keys (see :mod:`wove.options`), the backend
#: callback and re-delivery keys included.
SLURM_OPTIONS = OptionSpec("slurm", [
    Option("submit", Kind("a callable submit(payload, frame, config)", _submit),
           doc="submit each payload yourself (returns the Slurm job id to watch, or None)"),
    Option("command", STR, DEFAULT_COMMAND, "what a job runs; the payload file's path is appended"),
    Option("sbatch", Kind("an sbatch command as a list of strings (or one string), without --job-name, "
                          "--output or --wrap", _sbatch), ["sbatch", "--parsable"],
           "the submit command and its options (--partition, --time, --account...)"),
    Option("scancel", ARGV, ["scancel"], "the cancel command"),
    Option("squeue", ARGV, ["squeue"], "the command that lists jobs"),
    Option("job_name_prefix", STR, "wove", "job names are <prefix>-<run id or idempotency key>"),
    Option("payload_dir", path_of_directory(),
           doc="directory for payload and output files (shared with the compute nodes); default: a private "
               "temporary directory"),
    Option("poll_interval", POSITIVE_SECONDS, DEFAULT_POLL_INTERVAL, "seconds between two squeue calls"),
    Option("loss_grace_seconds", NON_NEGATIVE_SECONDS, DEFAULT_LOSS_GRACE_SECONDS,
           "how long an ended job waits for the worker's own terminal callback"),
    Option("controller_timeout", POSITIVE_SECONDS, DEFAULT_CONTROLLER_TIMEOUT,
           "seconds squeue may keep failing before the pending runs are declared lost"),
    CALLBACK_OPTIONS,
])


def job_name(prefix: str, run_id: str, key: str | None = None) -> str:
    """``<prefix>-<key>`` for an idempotency-keyed run, else ``<prefix>-<run_id>`` (Wove 2.x's name).

    Characters Slurm or a file name would not take (commas separate names in ``squeue
    --name``) become ``_``, and then a hash of the original is appended, so two keys never
    share a name.
    """
    raw = f"{prefix}-{key if key is not None else run_id}"
    safe = _SAFE.sub("_", raw)
    if safe != raw or len(safe) > 200:
        safe = f"{safe[:180]}-{hashlib.sha1(raw.encode('utf-8')).hexdigest()[:12]}"
    return safe



@dataclass(eq=False)
class SlurmSubmission:
    """One run's delivery: the job it follows (None: its outcome was known already, or a
    custom ``submit`` returned no job id)."""

    run_id: str
    task_id: str
    job: SlurmJob | None = None
    cancelled: bool = False


@dataclass(eq=False)
class SlurmJob:
    """A Slurm job the adapter watches, with the runs that wait for it."""

    job_id: str
    name: str
    owner: str
    output: str | None = None
    payload_file: str | None = None
    keyed: bool = False
    submitted_at: float = 0.0
    seen: bool = False
    followers: list[SlurmSubmission] = field(default_factory=list)


class SlurmAdapter(BackendAdapter):
    """Runs each payload as a Slurm batch job.

    ``executor_config`` keys (:data:`SLURM_OPTIONS`; Wove 2.x's keys first): ``submit``,
    ``command``, ``sbatch``, ``scancel``, ``job_name_prefix``; then ``squeue``,
    ``payload_dir``, ``poll_interval``, ``loss_grace_seconds``, ``controller_timeout`` and
    the backend callback and re-delivery keys.

    The job name is ``<prefix>-<run_id>``, or ``<prefix>-<delivery_idempotency_key>``: a
    keyed run first looks for a job of that name (``squeue --name``) and joins it, or for
    the outcome a finished one left in its output file, and only submits when there is none.
    """

    required_modules = ()
    install_hint = "wove-executor-slurm"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._options: dict[str, Any] = {}
        self._dir = ""
        self._own_dir = False
        self._user = ""
        self._jobs: dict[str, SlurmJob] = {}
        self._by_name: dict[str, SlurmJob] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._poller: asyncio.Task[None] | None = None
        self._finishing: set[asyncio.Task[None]] = set()
        self._failing_since: float | None = None
        self._closing = False

    @property
    def payload_dir(self) -> str:
        """Where payload and output files go (a private temporary directory by default)."""
        return self._dir

    async def start(self) -> None:
        """Validate the config, check the Slurm commands and the controller, make the payload directory.

        Raises:
            ConfigError: an unknown ``executor_config`` key (with a did-you-mean) or a bad value.
            RuntimeError: ``sbatch``/``squeue``/``scancel`` is not on PATH (names the key).
            OSError: the Slurm controller does not answer ``squeue`` (with its message).
        """
        options = SLURM_OPTIONS.validate(self.config)
        self._options = options
        self._closing = False
        self._user = getpass.getuser()
        if options["submit"] is None:
            for key in ("sbatch", "squeue", "scancel"):
                program = options[key][0]
                if shutil.which(program) is None:
                    raise RuntimeError(
                        f"slurm executor: {program!r} (executor_config.{key} = {options[key]!r}) is not on PATH. "
                        "Run the environment on a machine with the Slurm client commands (Debian: apt install "
                        f"slurm-client), or set executor_config.{key} to the command's full path.")
            code, out, err = await self._command([*options["squeue"], "-h", "-u", self._user, "-o", "%i"])
            if code != 0:
                raise OSError(f"slurm executor: the Slurm controller does not answer: `{options['squeue'][0]} -u "
                              f"{self._user}` exited {code}: {err.strip() or out.strip()}. Check that slurmctld runs "
                              "and that SLURM_CONF points at the cluster's slurm.conf.")
        if options["payload_dir"] is not None:
            self._dir, self._own_dir = options["payload_dir"], False
        else:
            self._dir, self._own_dir = tempfile.mkdtemp(prefix="wove-slurm-"), True
        self._poller = asyncio.ensure_future(self._poll())

    # -- commands ----------------------------------------------------------------------------
    async def _command(self, argv: list[str], *, umask: int = -1) -> tuple[int, str, str]:
        """Run ``argv``; return (exit code, stdout, stderr). 127 when it cannot be started."""
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, umask=umask)
        except OSError as exc:
            return 127, "", f"{argv[0]}: {exc}"
        try:
            out, err = await asyncio.wait_for(proc.communicate(), COMMAND_TIMEOUT)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            proc.kill()
            await proc.wait()
            raise
        return int(proc.returncode or 0), out.decode("utf-8", "replace"), err.decode("utf-8", "replace")

    def _write_payload(self, name: str, payload: dict[str, Any]) -> str:
        path = os.path.join(self._dir, f"{name}.{secrets.token_hex(6)}.payload.json")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            json.dump(payload, file, separators=(",", ":"))
        return path

    # -- submit ------------------------------------------------------------------------------
    async def submit(self, payload: dict[str, Any], frame: dict[str, Any]) -> SlurmSubmission:
        """Submit ``payload`` as a job (or join the keyed job already there).

        Raises:
            RuntimeError: ``sbatch`` failed (its message), or a custom ``submit`` raised.
        """
        options = self._options
        run_id, task_id = str(payload["run_id"]), str(payload["task_id"])
        key = (frame.get("delivery") or {}).get("delivery_idempotency_key")
        key = key if isinstance(key, str) else None
        attempt = int(payload.get("attempt") or 1)
        submission = SlurmSubmission(run_id=run_id, task_id=task_id)
        if options["submit"] is not None:
            await self._custom_submit(submission, payload, frame)
            return submission
        name = job_name(options["job_name_prefix"], run_id, key)
        if key is None:
            await self._sbatch(submission, payload, name, f"{name}.{attempt}.{secrets.token_hex(4)}.out")
            return submission
        # A duplicate gets the first execution's outcome from its output file: the payload of
        # a keyed run asks the job to keep it there (keep_outcome).
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:  # two runs of one key in this process: the second joins the first's job
            if attempt <= 1 and await self._join(submission, name):
                return submission
            await self._sbatch(submission, payload, name, f"{name}.out", keyed=True)
        return submission

    async def _sbatch(self, submission: SlurmSubmission, payload: dict[str, Any], name: str, output: str,
                      keyed: bool = False) -> None:
        options = self._options
        payload_file = self._write_payload(name, payload)
        output_file = os.path.join(self._dir, output)
        argv = [*options["sbatch"], "--job-name", name, "--output", output_file, "--no-requeue",
                "--wrap", f"exec {options['command']} {shlex.quote(payload_file)}"]
        try:
            code, out, err = await self._command(argv, umask=0o077)  # the output file: 0600 too
        except BaseException:
            _remove(payload_file)
            raise
        job_id = out.strip().split(";", 1)[0]
        if code != 0 or not job_id.isdigit():
            _remove(payload_file)
            raise RuntimeError(f"slurm executor: `{' '.join(options['sbatch'])} --job-name {name} ...` failed "
                               f"(exit {code}): {(err.strip() or out.strip())[:500]}")
        job = SlurmJob(job_id=job_id, name=name, owner=submission.run_id, output=output_file,
                       payload_file=payload_file, keyed=keyed, submitted_at=asyncio.get_running_loop().time())
        self._follow(job, submission)
        if keyed:
            self._by_name[name] = job

    def _follow(self, job: SlurmJob, submission: SlurmSubmission) -> None:
        submission.job = job
        job.followers.append(submission)
        self._jobs[job.job_id] = job

    async def _join(self, submission: SlurmSubmission, name: str) -> bool:
        """Join the job of this key (ours, or one ``squeue`` lists), or settle from the
        outcome a finished one left; False when there is none."""
        known = self._by_name.get(name)
        if known is not None and known.job_id in self._jobs:
            self._follow(known, submission)
            return True
        code, out, err = await self._command([*self._options["squeue"], "-h", "-u", self._user, "-t", ACTIVE_STATES,
                                              "--name", name, "-o", "%i"])
        if code != 0:  # submitting now could run the key twice
            raise RuntimeError(f"slurm executor: cannot look for a job named {name!r} (delivery_idempotency_key): "
                               f"squeue exited {code}: {(err or out).strip()[:300]}")
        ids = [line.strip() for line in out.splitlines() if line.strip()]
        output = os.path.join(self._dir, f"{name}.out")
        if ids:
            job = SlurmJob(job_id=ids[0], name=name, owner="", output=output, keyed=True,
                           submitted_at=asyncio.get_running_loop().time())
            self._follow(job, submission)
            self._by_name[name] = job
            return True
        status = await asyncio.to_thread(_read_status, output)
        if status is None:
            return False
        self._spawn(self.settle(submission.run_id, status, attached=True,
                                what=f"Slurm job {name!r} (finished before; its output file {output})"))
        return True

    async def _custom_submit(self, submission: SlurmSubmission, payload: dict[str, Any],
                             frame: dict[str, Any]) -> None:
        result = self._options["submit"](payload, frame, self.config)
        if asyncio.iscoroutine(result) or hasattr(result, "__await__"):
            result = await result
        if isinstance(result, (int, str)) and str(result).strip().split(";", 1)[0].isdigit():
            job = SlurmJob(job_id=str(result).strip().split(";", 1)[0], name="(custom submit)",
                           owner=submission.run_id, submitted_at=asyncio.get_running_loop().time())
            self._follow(job, submission)

    # -- cancel ------------------------------------------------------------------------------
    async def cancel(self, run_id: str, submission: Any, frame: dict[str, Any]) -> None:
        """``scancel`` the run's job (Slurm sends it SIGTERM, which cancels the run in the job).

        Only the run that submitted the job cancels it, and only when no duplicate of its
        key still waits for it.
        """
        if not isinstance(submission, SlurmSubmission):
            return
        submission.cancelled = True
        job = submission.job
        if job is None or job.job_id not in self._jobs:
            return
        if job.owner != run_id:
            return  # a duplicate joined another run's (or another process's) job: its submitter decides
        if any(not s.cancelled and self.is_pending(s.run_id) for s in job.followers if s is not submission):
            return  # duplicates of its key still wait for it
        code, out, err = await self._command([*self._options["scancel"], job.job_id])
        if code != 0:
            logger.warning("slurm executor: `%s %s` failed (exit %s): %s", " ".join(self._options["scancel"]),
                           job.job_id, code, (err or out).strip())

    # -- watching ----------------------------------------------------------------------------
    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    async def _poll(self) -> None:
        interval = float(self._options["poll_interval"])
        while not self._closing:
            await asyncio.sleep(interval)
            try:
                await self._poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # never stop watching: say so and go on
                logger.exception("slurm executor: watching the Slurm jobs failed")

    async def _poll_once(self) -> None:
        # Jobs whose runs all have their outcome (the callback brought it) need no watching;
        # a keyed job's output file stays, for later duplicates.
        for job in list(self._jobs.values()):
            if all(s.cancelled or not self.is_pending(s.run_id) for s in job.followers):
                self._forget(job, remove_output=not job.keyed)
        if not self._jobs:
            self._failing_since = None
            return
        loop = asyncio.get_running_loop()
        code, out, err = await self._command([*self._options["squeue"], "-h", "-u", self._user, "-t", "all",
                                              "-o", "%i|%T|%r"])
        now = loop.time()
        if code != 0:
            self._failing_since = self._failing_since or now
            if now - self._failing_since >= float(self._options["controller_timeout"]):
                reason = (f"slurm executor: squeue has failed for {now - self._failing_since:.0f} s "
                          f"(executor_config.controller_timeout): {(err or out).strip()[:300]}; the Slurm "
                          "controller is down or unreachable")
                for job in list(self._jobs.values()):
                    self._forget(job, remove_output=False)
                    for submission in job.followers:
                        if not submission.cancelled and self.is_pending(submission.run_id):
                            self.report_lost(submission.run_id, f"{reason}, and Slurm job {job.job_id} "
                                             f"({job.name!r}) cannot be followed.")
                self._failing_since = None
            else:
                logger.warning("slurm executor: squeue failed (exit %s): %s", code, (err or out).strip()[:300])
            return
        self._failing_since = None
        states: dict[str, tuple[str, str]] = {}
        for line in out.splitlines():
            parts = line.strip().split("|")
            if len(parts) >= 2:
                states[parts[0]] = (parts[1].split()[0], parts[2] if len(parts) > 2 else "")
        for job in list(self._jobs.values()):
            entry = states.get(job.job_id)
            if entry is None:
                if job.seen or now - job.submitted_at >= MISSING_GRACE:
                    self._forget(job)
                    self._spawn(self._finish(job, "no longer known to Slurm", ""))
                continue
            job.seen = True
            if entry[0] in TERMINAL_STATES:
                self._forget(job)
                self._spawn(self._finish(job, entry[0], entry[1]))

    def _forget(self, job: SlurmJob, *, remove_output: bool = False) -> None:
        self._jobs.pop(job.job_id, None)
        if self._by_name.get(job.name) is job:
            del self._by_name[job.name]
        if job.payload_file:
            _remove(job.payload_file)  # a job cancelled before it started never read it
        if remove_output and job.output:
            _remove(job.output)

    async def _finish(self, job: SlurmJob, state: str, reason: str) -> None:
        """The job ended: deliver the outcome its output file holds, or report its runs lost."""
        waiting = [s for s in job.followers if not s.cancelled and self.is_pending(s.run_id)]
        text = await asyncio.to_thread(_read, job.output) if job.output and waiting else ""
        status = parse_status(text) if text else None
        what = f"Slurm job {job.job_id} ({job.name!r})"
        for submission in waiting:
            if status is not None:
                await self.settle(submission.run_id, status, what=what, attached=job.keyed)
                continue
            if await self.wait_for_terminal(submission.run_id, float(self._options["loss_grace_seconds"])):
                continue
            detail = await self._exit_detail(job.job_id) if state != "no longer known to Slurm" else ""
            tail = " | ".join(line.strip() for line in text.strip().splitlines()[-3:])[-400:]
            self.report_lost(
                submission.run_id,
                f"slurm executor: {what} ended {state}{f' ({reason})' if reason and reason != 'None' else ''}"
                f"{detail} before its worker reported the run's outcome"
                f"{f'; the end of its output file {job.output}: {tail}' if tail else ''}.")
        if job.output and not job.keyed:
            _remove(job.output)

    async def _exit_detail(self, job_id: str) -> str:
        """``, exit code 0:9`` from ``scontrol show job`` (best effort)."""
        scontrol = os.path.join(os.path.dirname(shutil.which(self._options["squeue"][0]) or ""), "scontrol")
        if not os.path.exists(scontrol):
            return ""
        code, out, _err = await self._command([scontrol, "show", "job", "-o", job_id])
        match = re.search(r"\bExitCode=(\d+):(\d+)", out) if code == 0 else None
        if match is None:
            return ""
        status, signal_number = match.groups()
        return (f", killed by signal {signal_number}" if signal_number != "0"
                else f", exit code {status}")

    async def close(self) -> None:
        """Stop watching; remove the private payload directory once no job of it can still start."""
        self._closing = True
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
            self._poller = None
        for task in list(self._finishing):
            task.cancel()
        await asyncio.gather(*self._finishing, return_exceptions=True)
        for job in self._jobs.values():
            if not job.keyed and job.output and all(s.cancelled or not self.is_pending(s.run_id) for s in job.followers):
                _remove(job.output)  # nobody reads it any more
        waiting = [job for job in self._jobs.values() if job.payload_file and os.path.exists(job.payload_file)]
        self._jobs.clear()
        self._by_name.clear()
        if self._own_dir and self._dir:
            if waiting:  # detached runs whose jobs have not started: they still need their payloads
                logger.info("slurm executor: leaving %s for %d job(s) that have not started", self._dir, len(waiting))
            else:
                shutil.rmtree(self._dir, ignore_errors=True)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.debug("slurm executor: removing %s failed: %r", path, exc)


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            return file.read()
    except OSError:
        return ""


def _read_status(path: str) -> dict[str, Any] | None:
    return parse_status(_read(path))

