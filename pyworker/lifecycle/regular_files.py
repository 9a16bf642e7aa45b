"""The worker's own files (the benchmark cache, the reference marker, the model's log) are used
only when they are what they claim to be: regular files, of a sane size where it is read whole.

Whoever can write the working folder or the cache folder can put something else at those
names: a symlink to `/dev/zero` (read whole, it fills memory), a FIFO (opening it waits for a
writer), a directory, a device (opening some acts on them). What is at a path is looked at
before it is opened, opened without blocking, and checked again on the open descriptor, so a
swap between the two is caught; a read stops at its bound. A write makes a new file beside the
name (`O_EXCL`: never through a link) and renames it over the name, which replaces a symlink
there rather than following it, and readers see the old content or the new, never a part.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import stat
from pathlib import Path

_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISLNK, "a symbolic link"),
)


class UnusableFile(OSError):
    """What is at `path` is not a regular file (or is too large); `what` says what it is."""

    def __init__(self, path: Path, what: str) -> None:
        super().__init__(errno.EINVAL, what, str(path))
        self.path = path
        self.what = what

    def __str__(self) -> str:
        return f"{self.path} is {self.what}"


def kind_of(mode: int) -> str:
    """What a file of this mode is, in words ("a FIFO"); "a regular file" for one."""
    return next((kind for test, kind in _KINDS if test(mode)), "a regular file")


def _check(path: Path, status: os.stat_result, limit: int | None) -> None:
    if not stat.S_ISREG(status.st_mode):
        raise UnusableFile(path, f"{kind_of(status.st_mode)}, not a regular file")
    if limit is not None and status.st_size > limit:
        raise UnusableFile(path, f"larger than {limit} bytes")


def open_regular(
    path: Path, *, follow_symlinks: bool, limit: int | None = None
) -> tuple[int, os.stat_result] | None:
    """A read-only descriptor on the regular file at `path` and its status; None if nothing
    is there. Raises `UnusableFile` for anything else, and for a symlink unless followed."""
    try:
        _check(path, os.stat(path, follow_symlinks=follow_symlinks), limit)
        flags = _READ_FLAGS if follow_symlinks else _READ_FLAGS | os.O_NOFOLLOW
        descriptor = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as error:
        if error.errno == errno.ELOOP and not follow_symlinks:
            raise UnusableFile(path, "a symbolic link, not a regular file") from None
        raise
    try:
        status = os.fstat(descriptor)
        _check(path, status, limit)  # replaced between the look and the open
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor, status


def read_regular(path: Path, limit: int) -> bytes | None:
    """The bytes of the regular file at `path` (not through a symlink), at most `limit` of
    them; None if nothing is there. Raises `UnusableFile` for anything else."""
    opened = open_regular(path, follow_symlinks=False, limit=limit)
    if opened is None:
        return None
    descriptor, _ = opened
    try:
        chunks: list[bytes] = []
        left = limit + 1  # one more than allowed: a file that grew past its bound is seen
        while left > 0:
            chunk = os.read(descriptor, min(left, 64 * 1024))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(descriptor)
    if left <= 0:
        raise UnusableFile(path, f"larger than {limit} bytes")
    return b"".join(chunks)


def write_replacing(path: Path, data: bytes) -> None:
    """Make `path` a regular file holding `data`, replacing a regular file or a symlink there
    (never writing through it). Raises `UnusableFile` if something else is there."""
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not (stat.S_ISREG(status.st_mode) or stat.S_ISLNK(status.st_mode)):
            raise UnusableFile(path, f"{kind_of(status.st_mode)}, not a regular file")
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    descriptor = os.open(temporary, _CREATE_FLAGS, 0o644)
    try:
        with open(descriptor, "wb", closefd=True) as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


class OnceWarnings:
    """One warning for each thing wrong at a path, not one each time it is looked at.

    Bounded: it remembers the last `limit` paths (the worker has a handful of own files)."""

    def __init__(self, logger: logging.Logger, limit: int = 16) -> None:
        self._logger = logger
        self._limit = limit
        self._said: dict[Path, str] = {}

    def warn(self, path: Path, message: str) -> None:
        if self._said.get(path) == message:
            return
        self._said.pop(path, None)
        if len(self._said) >= self._limit:
            del self._said[next(iter(self._said))]
        self._said[path] = message
        self._logger.warning("%s", message, stacklevel=2)

    def clear(self, path: Path) -> None:
        """The path is fine again: the next thing wrong there is news."""
        self._said.pop(path, None)
