"""Give large freed buffers back to the operating system in worker processes.

glibc serves an allocation above its mmap threshold with its own mapping and unmaps it on
free, but it raises that threshold (up to 32 MiB) each time such a block is freed, so
after the first large result every later one comes from the heap and stays resident: a
worker that sent ten 20 MiB results keeps well over 100 MiB it no longer uses. Fixing the
threshold turns off that adjustment. Worker processes (``wove worker``, the stdio worker)
call :func:`release_large_buffers` once at start; a library never changes the allocator
of a process it is imported into.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

__all__ = ["release_large_buffers"]

logger = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3
#: Allocations at least this large get their own mapping, returned to the system on free.
MMAP_THRESHOLD = 1024 * 1024


def release_large_buffers(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes; False where that is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(_M_MMAP_THRESHOLD, threshold))
    logger.debug("mmap threshold fixed at %d bytes: %s", threshold, done)
    return done
