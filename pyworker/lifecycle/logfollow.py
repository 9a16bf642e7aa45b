"""Follow the model server's log file and pick out the lines that say *loaded*, *error* or *info*.

The follower polls (no inotify), reads in bounded chunks on a worker thread and never holds more
than one chunk plus one line in memory, so a huge or hostile log cannot stall the event loop or
grow the process. It waits for the file to appear, survives rotation (a new file at the path: the
old file is read to its end first) and truncation in place (copytruncate), holds a partial line
until it is completed, cuts over-long lines and decodes bytes that are not UTF-8 with U+FFFD.
Only a regular file is read (through a symlink too): a FIFO, a directory or a device at the path
is never read and never blocks the follower; it gets one warning each time what is there changes.

Lines end at `\\n`, `\\r\\n` or a lone `\\r` (progress bars redraw with `\\r`); blank lines are
skipped. A truncation followed by enough new output to pass the old offset before the next poll
cannot be seen by size; it is seen because the bytes just before the offset changed: every read
starts a few bytes early and checks them against what was read there last.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import AsyncGenerator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pyworker.backports import StrEnum
from pyworker.lifecycle.regular_files import UnusableFile, open_regular

logger = logging.getLogger(__name__)

CHUNK_SIZE = 64 * 1024
FINGERPRINT = 64
"""Bytes before the read position that must be unchanged for the file to be the same one."""
DEFAULT_MAX_LINE = 64 * 1024
_LINE_ENDS = (b"\n", b"\r")

FileIdentity = tuple[int, int]


class FollowState(StrEnum):
    IDLE = "idle"  # not started
    WAITING = "waiting"  # no file at the path yet
    FOLLOWING = "following"
    STOPPED = "stopped"


class LineKind(StrEnum):
    LOADED = "loaded"
    ERROR = "error"
    INFO = "info"


# A line that matches several patterns is reported once, as the first kind here: an error line
# that happens to contain the *loaded* text must not make the worker ready.
_PRECEDENCE = (LineKind.ERROR, LineKind.LOADED, LineKind.INFO)


@dataclass(frozen=True, slots=True)
class LogPattern:
    """A substring (or, with `regex`, a `re.search` pattern) that marks a line as `kind`.

    `fatal` only matters for errors: a fatal error puts the worker in ERRORED, a non-fatal one is
    only counted.
    """

    kind: LineKind
    text: str
    regex: bool = False
    fatal: bool = True
    _compiled: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.text:
            raise ValueError(f"empty {self.kind} pattern would match every line")
        if self.regex:
            try:
                compiled = re.compile(self.text)
            except re.error as error:
                raise ValueError(f"invalid {self.kind} regex {self.text!r}: {error}") from None
            object.__setattr__(self, "_compiled", compiled)

    @property
    def is_fatal(self) -> bool:
        return self.kind is LineKind.ERROR and self.fatal

    def match(self, line: str) -> bool:
        if self._compiled is not None:
            return self._compiled.search(line) is not None
        return self.text in line


@dataclass(frozen=True, slots=True)
class LogEvent:
    """A log line that matched `pattern`."""

    kind: LineKind
    line: str
    pattern: LogPattern

    @property
    def fatal(self) -> bool:
        return self.pattern.is_fatal


@dataclass(slots=True)
class FollowStats:
    """Counters for the status route; updated in place as the follower runs."""

    state: FollowState = FollowState.IDLE
    bytes_read: int = 0
    lines_read: int = 0
    lines_cut: int = 0
    rotations: int = 0
    truncations: int = 0
    matches: dict[LineKind, int] = field(default_factory=lambda: dict.fromkeys(LineKind, 0))

    def to_dict(self) -> dict[str, object]:
        return {
            "state": str(self.state),
            "bytes_read": self.bytes_read,
            "lines_read": self.lines_read,
            "lines_cut": self.lines_cut,
            "rotations": self.rotations,
            "truncations": self.truncations,
            "matches": {str(kind): count for kind, count in self.matches.items()},
        }


class _LineSplitter:
    """Turns chunks of bytes into complete lines, holding at most `max_line` bytes of a partial one.

    A line longer than `max_line` is yielded cut at `max_line` bytes as soon as that many are seen;
    the rest of it, up to the next line end, is dropped as it arrives.
    """

    def __init__(self, max_line: int) -> None:
        self._max_line = max_line
        self._pending = bytearray()
        self._discarding = False

    def feed(self, data: bytes) -> Iterator[tuple[bytes, bool]]:
        """Yield (line, was_cut) for each line completed by `data`."""
        for piece in data.splitlines(keepends=True):
            if piece.endswith(_LINE_ENDS):
                yield from self._complete(piece.rstrip(b"\r\n"))
            else:
                yield from self._hold(piece)

    def flush(self) -> Iterator[tuple[bytes, bool]]:
        """Yield the partial line, if any, as complete (its file has ended)."""
        yield from self._complete(b"")

    def reset(self) -> None:
        self._pending.clear()
        self._discarding = False

    def _complete(self, tail: bytes) -> Iterator[tuple[bytes, bool]]:
        if self._discarding:
            self._discarding = False
            return
        line = bytes(self._pending) + tail if self._pending else tail
        self._pending.clear()
        if len(line) > self._max_line:
            yield line[: self._max_line], True
        elif line:
            yield line, False

    def _hold(self, piece: bytes) -> Iterator[tuple[bytes, bool]]:
        if self._discarding:
            return
        self._pending += piece
        if len(self._pending) > self._max_line:
            line = bytes(self._pending[: self._max_line])
            self._pending.clear()
            self._discarding = True
            yield line, True


@dataclass(slots=True)
class _OpenFile:
    descriptor: int
    identity: FileIdentity
    position: int
    retired: bool = False  # a new file is at the path: read this one to its end, then switch
    tail: bytes = b""  # the last bytes read, just before `position`

    def advance(self, data: bytes) -> None:
        self.position += len(data)
        self.tail = (
            data[-FINGERPRINT:] if len(data) >= FINGERPRINT else (self.tail + data)[-FINGERPRINT:]
        )

    def restart(self) -> None:
        self.position = 0
        self.tail = b""


def _inspect(descriptor: int, path: Path) -> tuple[int, FileIdentity | None]:
    """Size of the open file, and identity of whatever is at `path` now (None if nothing)."""
    size = os.fstat(descriptor).st_size
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return size, None
    return size, (status.st_dev, status.st_ino)


class LogFollower:
    """Follows one log file; iterate `events()` (matching lines) or `lines()` (all lines) in a task.

    Reading positions are absolute (`os.pread`), so the follower never depends on a shared file
    offset, and a cancelled read left running in its thread cannot disturb anything.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        patterns: Iterable[LogPattern] = (),
        *,
        poll_interval: float = 0.2,
        max_line: int = DEFAULT_MAX_LINE,
        from_start: bool = True,
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        if poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        if max_line < 1 or chunk_size < 1:
            raise ValueError("max_line and chunk_size must be positive")
        self.path = Path(path)
        self.patterns = tuple(sorted(patterns, key=lambda pattern: _PRECEDENCE.index(pattern.kind)))
        self.stats = FollowStats()
        self._poll_interval = poll_interval
        self._chunk_size = chunk_size
        self._from_start = from_start
        self._splitter = _LineSplitter(max_line)
        self._stopping = asyncio.Event()
        self._file: _OpenFile | None = None
        self._resume: tuple[FileIdentity, int] | None = None
        self._last_error = ""
        self._running = False

    def stop(self) -> None:
        """End the iteration at the next poll (within one chunk or one poll interval)."""
        self._stopping.set()

    def classify(self, line: str) -> LogPattern | None:
        """The pattern `line` matches, by precedence error > loaded > info; None if none does."""
        for pattern in self.patterns:
            if pattern.match(line):
                return pattern
        return None

    async def events(self) -> AsyncGenerator[LogEvent, None]:
        """Yield each line that matches a pattern, counted in `stats.matches`."""
        async with contextlib.aclosing(self.lines()) as lines:
            async for line in lines:
                pattern = self.classify(line)
                if pattern is not None:
                    self.stats.matches[pattern.kind] += 1
                    yield LogEvent(pattern.kind, line, pattern)

    async def lines(self) -> AsyncGenerator[str, None]:
        """Yield every non-blank line of the file, across rotations, until `stop()` or cancel."""
        if self._running:
            raise RuntimeError(f"already following {self.path}")
        self._running = True
        skip_existing = not self._from_start
        try:
            while not self._stopping.is_set():
                try:
                    if self._file is None:
                        self._file = await self._open(skip_existing)
                        skip_existing = False
                    batch = [] if self._file is None else await self._step(self._file)
                except OSError as error:
                    self._report(error)
                    self._close()
                    batch = []
                if self._file is None:
                    await self._pause()
                for line in batch:
                    yield line
        finally:
            self._close()
            self.stats.state = FollowState.STOPPED
            self._running = False

    async def _open(self, skip_existing: bool) -> _OpenFile | None:
        try:
            # A symlink to a regular file is followed (supervisors link logs); anything else
            # (a FIFO, a directory, a device) is never opened, or closed at once, and waited out.
            opened = await asyncio.to_thread(open_regular, self.path, follow_symlinks=True)
        except UnusableFile as error:
            self._report(error)
            opened = None
        else:
            if opened is None:
                self._last_error = ""  # nothing there: whatever comes next is news
        if opened is None:
            if self.stats.state is not FollowState.WAITING:
                logger.info("waiting for log %s to appear", self.path)
                self.stats.state = FollowState.WAITING
            return None
        descriptor, status = opened
        identity, size = (status.st_dev, status.st_ino), status.st_size
        position = size if skip_existing else 0
        if self._resume is not None and self._resume[0] == identity and self._resume[1] <= size:
            position = self._resume[1]  # reopened after an I/O error: do not repeat lines
        else:
            self._splitter.reset()
        self._last_error = ""
        self.stats.state = FollowState.FOLLOWING
        logger.info("following log %s from byte %d", self.path, position)
        return _OpenFile(descriptor, identity, position)

    async def _step(self, current: _OpenFile) -> list[str]:
        """Read one chunk and return the lines it completes; at the end of the file, look around."""
        back = len(current.tail)
        data = await asyncio.to_thread(
            os.pread, current.descriptor, self._chunk_size + back, current.position - back
        )
        if back and data[:back] != current.tail:
            self._truncated(current, "rewritten")
            return []
        data = data[back:]
        if data:
            current.advance(data)
            self.stats.bytes_read += len(data)
            return self._decode(self._splitter.feed(data))
        if current.retired:
            lines = self._decode(self._splitter.flush())
            self._close()
            return lines
        size, identity_at_path = await asyncio.to_thread(_inspect, current.descriptor, self.path)
        if size < current.position:
            self._truncated(current, f"{current.position} -> {size} bytes")
        elif identity_at_path is not None and identity_at_path != current.identity:
            logger.info("log %s rotated; finishing the old file", self.path)
            self.stats.rotations += 1
            current.retired = True
        else:
            await self._pause()
        return []

    def _truncated(self, current: _OpenFile, how: str) -> None:
        logger.info("log %s truncated (%s); reading from start", self.path, how)
        self.stats.truncations += 1
        current.restart()
        self._splitter.reset()

    def _decode(self, lines: Iterable[tuple[bytes, bool]]) -> list[str]:
        decoded = []
        for raw, was_cut in lines:
            # A writer without O_APPEND after copytruncate leaves a run of NULs: not text.
            text = raw.replace(b"\x00", b"") if b"\x00" in raw else raw
            if not text.strip():
                continue
            decoded.append(text.decode("utf-8", errors="replace"))
            self.stats.lines_cut += was_cut
        self.stats.lines_read += len(decoded)
        return decoded

    def _report(self, error: OSError) -> None:
        """Log an I/O error, or what is at the path, once per change, not at every poll."""
        if isinstance(error, UnusableFile):
            message = f"log {error}; waiting for a regular file there"
        else:
            reason = f"{type(error).__name__}: {error.strerror or error}"
            message = f"cannot read log {self.path} ({reason}); retrying"
        if message != self._last_error:
            logger.warning("%s", message)
            self._last_error = message

    async def _pause(self) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), self._poll_interval)

    def _close(self) -> None:
        # Closing a read-only descriptor does not wait on the disk, so it is done inline (this
        # also runs from `finally` during cancellation, where awaiting is unreliable).
        if self._file is not None:
            self._resume = (
                None if self._file.retired else (self._file.identity, self._file.position)
            )
            os.close(self._file.descriptor)
            self._file = None
