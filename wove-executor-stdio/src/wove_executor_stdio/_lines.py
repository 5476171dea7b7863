"""JSON-lines framing over asyncio streams, for frames of any size, and the ready signal
(shared by the executor and the worker program, so neither imports the other).

``StreamReader.readline`` fails on a line longer than the reader's ``limit``; raising the
limit also raises the amount buffered before the pipe is paused. :func:`read_line` keeps
a modest limit (so flow control still works) and assembles longer lines piecewise.
"""

from __future__ import annotations

import asyncio

__all__ = ["READY_KEY", "STREAM_LIMIT", "read_line"]

#: Field of the worker's first ``log`` event that tells the executor the worker is ready.
READY_KEY = "wove_stdio_ready"

#: StreamReader limit: a line longer than this is assembled in pieces; reading pauses
#: at twice this much unread data.
STREAM_LIMIT = 1 << 20


async def read_line(reader: asyncio.StreamReader) -> bytes | None:
    """Return the next line without its ``\\n`` (of any length), or None at end of stream.

    A last line without a trailing newline is returned as a line.
    """
    parts: list[bytes] = []
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as exc:
            # ``exc.consumed`` bytes hold no separator: take them out and look again.
            parts.append(await reader.readexactly(exc.consumed))
            continue
        except asyncio.IncompleteReadError as exc:
            parts.append(exc.partial)
            tail = b"".join(parts)
            return tail if tail else None
        if parts:
            parts.append(line[:-1])
            return b"".join(parts)
        return line[:-1]
