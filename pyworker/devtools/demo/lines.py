"""Writing log lines off the event loop.

Lines go through a bounded queue to a thread that writes and flushes each one, so a slow disk or
a full pipe never stalls request handling; when the queue is full, lines are dropped and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from pathlib import Path
from typing import TextIO

logger = logging.getLogger(__name__)

_BATCH = 256


class LineWriter:
    def __init__(self, path: Path | None = None, capacity: int = 10_000) -> None:
        self.path = path
        self.dropped = 0
        self._queue: asyncio.Queue[str | None] = asyncio.Queue(capacity)
        self._stream: TextIO | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.path is None:
            self._stream = sys.stdout
        else:
            self._stream = await asyncio.to_thread(self.path.open, "a", encoding="utf-8")
        self._task = asyncio.create_task(self._drain())

    def write(self, line: str) -> None:
        """Queue one line (without its newline); never blocks."""
        try:
            self._queue.put_nowait(line)
        except asyncio.QueueFull:
            self.dropped += 1

    async def close(self) -> None:
        """Write what is queued, then close the file."""
        if self._task is not None and not self._task.done():
            await self._queue.put(None)
            await self._task
        if self._stream is not None and self.path is not None:
            await asyncio.to_thread(self._stream.close)
        self._stream = None

    async def _drain(self) -> None:
        while True:
            batch: list[str] = []
            item = await self._queue.get()
            while item is not None:
                batch.append(item)
                if len(batch) >= _BATCH or self._queue.empty():
                    break
                item = self._queue.get_nowait()
            if batch:
                await asyncio.to_thread(self._write_lines, batch)
            if item is None:
                return

    def _write_lines(self, lines: list[str]) -> None:
        stream = self._stream
        if stream is None:
            return
        with contextlib.suppress(OSError, ValueError):  # a closed pipe must not kill the server
            for line in lines:
                stream.write(line + "\n")
                stream.flush()
