"""Showing progress on a terminal: a spinner for waits of unknown length, a bar for counted work.

On a terminal both redraw one line in place; anywhere else (a pipe, a CI log) they print plain
lines, and only when something changed, so a log does not fill with animation frames. The
drawing methods write to the stream directly: call them from a thread (the async helpers do).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import threading
import time
from typing import TextIO

_CLEAR_LINE = "\r\x1b[K"
_UNICODE_FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
_ASCII_FRAMES = "|/-\\"
TICK_SECONDS = 0.1


def _interactive(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _speaks_unicode(stream: TextIO) -> bool:
    encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
    return encoding in ("utf8", "utf16", "utf32")


class Spinner:
    """One labelled wait at a time: `start(label)`, then `succeed(text)` or `fail(text)`."""

    def __init__(self, stream: TextIO | None = None, interactive: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.interactive = _interactive(self.stream) if interactive is None else interactive
        unicode = _speaks_unicode(self.stream)
        self._frames = _UNICODE_FRAMES if unicode else _ASCII_FRAMES
        self._ok_mark, self._fail_mark = ("✓", "✗") if unicode else ("ok", "!!")
        self._waiting_mark = "…" if unicode else "..."
        self._lock = threading.Lock()
        self._label = ""
        self._started = time.monotonic()
        self._frame = 0

    @property
    def label(self) -> str:
        return self._label

    def elapsed(self) -> float:
        return time.monotonic() - self._started

    def start(self, label: str) -> None:
        with self._lock:
            self._started = time.monotonic()
            self._show(label)

    def relabel(self, label: str) -> None:
        """Change the label of the current wait without restarting its clock."""
        with self._lock:
            if label != self._label:
                self._show(label)

    def note(self, text: str) -> None:
        """Print `text` on its own lines above the spinner, which is redrawn below it."""
        with self._lock:
            prefix = _CLEAR_LINE if self.interactive else ""
            self._write(f"{prefix}{text}\n")
            if self.interactive and self._label:
                self._draw()

    def tick(self) -> None:
        with self._lock:
            if self.interactive and self._label:
                self._frame = (self._frame + 1) % len(self._frames)
                self._draw()

    def succeed(self, text: str) -> None:
        self._finish(self._ok_mark, text)

    def fail(self, text: str) -> None:
        self._finish(self._fail_mark, text)

    def _finish(self, mark: str, text: str) -> None:
        with self._lock:
            prefix = _CLEAR_LINE if self.interactive else ""
            self._write(f"{prefix}{mark} {text}\n")
            self._label = ""

    def _show(self, label: str) -> None:
        """Label the wait: redrawn in place on a terminal, a line of its own elsewhere."""
        self._label = label
        if self.interactive:
            self._draw()
        else:
            self._write(f"{self._waiting_mark} {label}\n")

    def _draw(self) -> None:
        frame = self._frames[self._frame]
        line = f"{frame} {self._label} ({self.elapsed():.1f} s)"
        width = shutil.get_terminal_size().columns
        self._write(_CLEAR_LINE + line[: max(width - 1, 1)])  # a wrapped line cannot be redrawn

    def _write(self, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):  # a closed terminal must not crash us
            self.stream.write(text)
            self.stream.flush()


async def spin(spinner: Spinner, interval: float = TICK_SECONDS) -> None:
    """Animate `spinner` until cancelled."""
    while True:
        await asyncio.sleep(interval)
        await asyncio.to_thread(spinner.tick)


class ProgressBar:
    """Progress through `total` items: a redrawn bar on a terminal, a line per tenth elsewhere."""

    def __init__(
        self,
        total: int,
        stream: TextIO | None = None,
        interactive: bool | None = None,
        width: int = 30,
    ) -> None:
        self.total = max(total, 1)
        self.stream = stream or sys.stderr
        self.interactive = _interactive(self.stream) if interactive is None else interactive
        self.width = width
        unicode = _speaks_unicode(self.stream)
        self._full, self._empty = ("█", "░") if unicode else ("#", ".")
        self._last_tenth = -1
        self._lock = threading.Lock()

    def render(self, done: int, detail: str = "") -> str:
        fraction = min(max(done / self.total, 0.0), 1.0)
        filled = round(fraction * self.width)
        bar = self._full * filled + self._empty * (self.width - filled)
        suffix = f"  {detail}" if detail else ""
        return f"[{bar}] {done}/{self.total}{suffix}"

    def update(self, done: int, detail: str = "") -> None:
        with self._lock:
            if self.interactive:
                self._write(_CLEAR_LINE + self.render(done, detail))
                return
            tenth = min(done * 10 // self.total, 10)
            if tenth != self._last_tenth:
                self._last_tenth = tenth
                self._write(self.render(done, detail) + "\n")

    def finish(self, done: int, detail: str = "") -> None:
        """Draw the final state and end the line."""
        with self._lock:
            if self.interactive:
                self._write(_CLEAR_LINE + self.render(done, detail) + "\n")
            elif min(done * 10 // self.total, 10) != self._last_tenth:
                self._write(self.render(done, detail) + "\n")

    def _write(self, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.stream.write(text)
            self.stream.flush()
