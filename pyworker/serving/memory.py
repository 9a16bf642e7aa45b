"""Giving memory back to the system after a burst of large request bodies.

glibc serves a large allocation from `mmap` only while it is above the mmap threshold, and
raises that threshold each time such a block is freed: after one 30 MB body, the next ones come
from the heap, and freeing them leaves the process that much larger for good. So the threshold
is pinned at start (`pin_mmap_threshold`), and after a burst of large bodies `trim_soon` asks
glibc to return free heap pages (`malloc_trim`), once, off the event loop. Elsewhere than glibc
both are no-ops.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1024 * 1024
"""Blocks of 1 MiB and more are mapped, and unmapped when freed."""
TRIM_DELAY = 1.0


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        library = ctypes.CDLL(name)
        library.gnu_get_libc_version  # noqa: B018 - present in glibc only
    except (OSError, AttributeError):
        return None
    return library


_LIBC = _glibc()


def pin_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold, so large blocks go back to the system when freed."""
    if _LIBC is None:
        return False
    return bool(_LIBC.mallopt(M_MMAP_THRESHOLD, threshold))


def trim() -> bool:
    """Return free heap memory to the system now; True if some was returned."""
    if _LIBC is None:
        return False
    return bool(_LIBC.malloc_trim(0))


class Trimmer:
    """Schedules one `trim` a moment after large buffers were released, however many were."""

    def __init__(self, delay: float = TRIM_DELAY) -> None:
        self.delay = delay
        self.trims = 0
        self._scheduled: asyncio.TimerHandle | None = None
        self._running: asyncio.Future[bool] | None = None

    def trim_soon(self) -> None:
        if _LIBC is None or self._scheduled is not None:
            return
        loop = asyncio.get_running_loop()
        self._scheduled = loop.call_later(self.delay, self._trim, loop)

    def _trim(self, loop: asyncio.AbstractEventLoop) -> None:
        self._scheduled = None
        if self._running is not None and not self._running.done():
            # Buffers were freed while a trim ran: it may have missed them, so trim again later.
            self._scheduled = loop.call_later(self.delay, self._trim, loop)
            return
        self.trims += 1
        self._running = loop.run_in_executor(None, trim)
