"""Reading the outcomes of pending engine jobs by polling, for engines that cannot push them.

arq and taskiq (and any engine whose client can only ask "is job X done?") keep their
results in a store the adapter reads. :class:`ResultPoller` is the one watcher loop such
adapters share: each pending submission is first read :data:`FIRST_CHECK_SECONDS` after it
was submitted, then at doubling gaps up to the adapter's ``poll_interval`` (so a short
job's outcome is picked up at once, a long one costs one read per ``poll_interval``); all
submissions due at once are read in one call (one round trip to the store); a liveness
check runs every ``liveness_seconds``; the loop sleeps until the next read is due or a
new submission arrives, and survives a store that went away for a moment.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Generic, Protocol, TypeVar

__all__ = ["FIRST_CHECK_SECONDS", "LIVENESS_SECONDS", "PolledSubmission", "ResultPoller"]

logger = logging.getLogger("wove.backend")

#: Seconds after submission of a job's first result read.
FIRST_CHECK_SECONDS = 0.005
#: Seconds between liveness checks (a dead worker's runs are found within a few of them).
LIVENESS_SECONDS = 0.5


class PolledSubmission(Protocol):
    """What :class:`ResultPoller` needs of a submission (a dataclass of the adapter's)."""

    run_id: str
    #: loop time of the next result read, and the gap after it
    next_check: float
    interval: float


S = TypeVar("S", bound=PolledSubmission)


class ResultPoller(Generic[S]):
    """The watcher task of a polling adapter.

    Args:
        submissions: the adapter's pending submissions by run id (shared, not copied): the
            poller drops those whose run is no longer pending, the adapter drops those it
            settled.
        is_pending: the adapter's :meth:`~wove_backend.BackendAdapter.is_pending`.
        read: ``await read(due)`` reads the outcomes of the submissions due now (each
            already rescheduled) and settles those that finished.
        check_liveness: ``await check_liveness(now)`` every ``liveness_seconds`` while
            anything is pending (report runs whose workers died), or None.
        poll_interval: the longest gap between two reads of one submission.
        what: names the watcher in the warning logged when a read fails.
    """

    def __init__(self, submissions: MutableMapping[str, S], *, is_pending: Callable[[str], bool],
                 read: Callable[[list[S]], Awaitable[None]],
                 check_liveness: Callable[[float], Awaitable[None]] | None = None,
                 poll_interval: float, what: str, liveness_seconds: float = LIVENESS_SECONDS) -> None:
        self.submissions = submissions
        self.poll_interval = poll_interval
        self.liveness_seconds = liveness_seconds
        self._is_pending, self._read, self._check_liveness, self._what = is_pending, read, check_liveness, what
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start watching (on the running loop)."""
        if self._task is None:
            self._task = asyncio.ensure_future(self._watch())

    def add(self, submission: S) -> None:
        """Watch ``submission``: its first read is due :data:`FIRST_CHECK_SECONDS` from now."""
        submission.interval = FIRST_CHECK_SECONDS
        submission.next_check = asyncio.get_running_loop().time() + FIRST_CHECK_SECONDS
        self.submissions[submission.run_id] = submission
        self._wake.set()

    async def stop(self) -> None:
        """Stop the watcher task (the submissions stay with the adapter)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _due(self, now: float) -> list[S]:
        due = [s for s in self.submissions.values() if s.next_check <= now]
        for submission in due:
            submission.interval = min(submission.interval * 2, self.poll_interval)
            submission.next_check = now + submission.interval
        return due

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        next_liveness = loop.time() + self.liveness_seconds
        while True:
            try:
                for run_id in [r for r in self.submissions if not self._is_pending(r)]:
                    del self.submissions[run_id]  # its outcome came through the callback
                if not self.submissions:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                due = self._due(loop.time())
                if due:
                    await self._read(due)
                if self._check_liveness is not None and loop.time() >= next_liveness:
                    await self._check_liveness(loop.time())
                    next_liveness = loop.time() + self.liveness_seconds
                soonest = min([s.next_check for s in self.submissions.values()], default=next_liveness)
                self._wake.clear()
                try:  # until the next read is due, or a new submission arrives
                    await asyncio.wait_for(self._wake.wait(), max(0.0, min(soonest, next_liveness) - loop.time()))
                except asyncio.TimeoutError:
                    pass
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store went away for a moment: keep watching
                logger.warning("%s: reading pending results failed: %r; retrying", self._what, exc)
                await asyncio.sleep(0.5)

