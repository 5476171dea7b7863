"""A counting gate with O(1) acquire and release.

``asyncio.Semaphore`` on some Python versions scans its waiters on every release, which
dominates hot paths with thousands of waiting runs; this gate keeps a FIFO of waiters.
"""

from __future__ import annotations

import asyncio
from collections import deque


class Gate:
    """At most ``limit`` holders; others wait in FIFO order."""

    __slots__ = ("_free", "_waiters", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._free = limit
        self._waiters: deque[asyncio.Future[None]] = deque()

    def try_acquire(self) -> bool:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return True
        return False

    async def acquire(self) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed to us as we were cancelled: pass it on
            else:
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot moves straight to the waiter
                return
        self._free += 1

    @property
    def held(self) -> int:
        return self.limit - self._free
