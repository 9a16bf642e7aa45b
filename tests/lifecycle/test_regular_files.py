"""The worker's own files against real special files: symlinks, FIFOs, folders, devices, huge."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pyworker.lifecycle.benchmark import (
    MAX_CACHE_BYTES,
    BenchmarkResult,
    read_cache,
    write_cache,
    write_marker,
)
from pyworker.lifecycle.regular_files import (
    OnceWarnings,
    UnusableFile,
    open_regular,
    read_regular,
    write_replacing,
)

LIMIT = 1024


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def folder(path: Path) -> Path:
    path.mkdir()
    return path


def link_to_zero(path: Path) -> Path:
    path.symlink_to("/dev/zero")
    return path


def huge(path: Path) -> Path:
    with path.open("wb") as file:
        file.truncate(4 * 2**30)  # sparse: 4 GiB that take no disk
    return path


SPECIAL: dict[str, tuple[Callable[[Path], Path], str]] = {
    "symlink to /dev/zero": (link_to_zero, "a symbolic link, not a regular file"),
    "FIFO": (fifo, "a FIFO, not a regular file"),
    "directory": (folder, "a directory, not a regular file"),
    "huge file": (huge, f"larger than {LIMIT} bytes"),
}


async def in_thread(function: Callable[..., Any], *arguments: Any) -> Any:
    """Run a blocking call with a deadline, so that one that would block fails the test."""
    return await asyncio.wait_for(asyncio.to_thread(function, *arguments), 10)


@pytest.mark.parametrize("name", sorted(SPECIAL))
async def test_a_special_file_is_refused_without_blocking_or_reading_it(
    tmp_path: Path, name: str
) -> None:
    make, what = SPECIAL[name]
    path = make(tmp_path / "benchmark.json")
    with pytest.raises(UnusableFile) as raised:
        await in_thread(read_regular, path, LIMIT)
    assert raised.value.what == what
    assert str(raised.value) == f"{path} is {what}"


def test_a_device_is_refused_and_a_regular_file_within_its_bound_is_read(tmp_path: Path) -> None:
    with pytest.raises(UnusableFile, match="a character device"):
        read_regular(Path("/dev/zero"), LIMIT)
    path = tmp_path / "cache.json"
    assert read_regular(path, LIMIT) is None  # nothing there
    path.write_bytes(b"x" * LIMIT)
    assert read_regular(path, LIMIT) == b"x" * LIMIT
    path.write_bytes(b"x" * (LIMIT + 1))
    with pytest.raises(UnusableFile, match=f"larger than {LIMIT} bytes"):
        read_regular(path, LIMIT)


def test_a_symlink_is_followed_only_when_asked_and_only_to_a_regular_file(tmp_path: Path) -> None:
    target = tmp_path / "model.real"
    target.write_text("loaded\n")
    (tmp_path / "model.log").symlink_to(target)
    opened = open_regular(tmp_path / "model.log", follow_symlinks=True)
    assert opened is not None
    descriptor, status = opened
    try:
        assert status.st_size == len("loaded\n")
        assert os.read(descriptor, 100) == b"loaded\n"
    finally:
        os.close(descriptor)
    with pytest.raises(UnusableFile, match="a symbolic link"):
        open_regular(tmp_path / "model.log", follow_symlinks=False)
    with pytest.raises(UnusableFile, match="a character device"):
        open_regular(link_to_zero(tmp_path / "zero.log"), follow_symlinks=True)
    with pytest.raises(UnusableFile, match="a FIFO"):
        open_regular(fifo(tmp_path / "fifo.log"), follow_symlinks=True)


def test_a_write_replaces_a_symlink_and_leaves_its_target_untouched(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    victim = elsewhere / "victim"
    victim.write_text("keep me")
    marker = tmp_path / "work" / ".has_benchmark"
    marker.parent.mkdir()
    marker.symlink_to(victim)
    write_replacing(marker, b"12.5")
    assert victim.read_text() == "keep me"
    assert not marker.is_symlink() and marker.read_bytes() == b"12.5"
    write_replacing(marker, b"13.0")  # a regular file there is replaced too
    assert marker.read_bytes() == b"13.0"
    assert sorted(p.name for p in marker.parent.iterdir()) == [".has_benchmark"]  # no temp left
    dangling = tmp_path / "work" / "dangling"
    dangling.symlink_to(tmp_path / "nowhere" / "created")
    write_replacing(dangling, b"1")
    assert not (tmp_path / "nowhere").exists() and dangling.read_bytes() == b"1"


@pytest.mark.parametrize("make", [fifo, folder], ids=["FIFO", "directory"])
def test_a_write_leaves_a_fifo_or_a_directory_alone(tmp_path: Path, make: Any) -> None:
    path = make(tmp_path / ".has_benchmark")
    with pytest.raises(UnusableFile, match="not a regular file"):
        write_replacing(path, b"12.5")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".has_benchmark"]
    assert not path.is_file()


def test_a_failed_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        write_replacing(tmp_path / "missing-folder" / "file", b"x")
    assert list(tmp_path.iterdir()) == []


def test_once_warnings_say_each_thing_once_and_stay_bounded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    warnings = OnceWarnings(logging.getLogger("test.once"), limit=2)
    with caplog.at_level(logging.WARNING, "test.once"):
        for _ in range(3):
            warnings.warn(tmp_path / "a", "a is a FIFO")
        warnings.warn(tmp_path / "a", "a is a directory")  # a change: said again
        warnings.clear(tmp_path / "a")
        warnings.warn(tmp_path / "a", "a is a directory")  # fine in between: news again
        for name in ("b", "c", "d"):
            warnings.warn(tmp_path / name, f"{name} is a FIFO")
    said = [record.getMessage() for record in caplog.records]
    assert said == ["a is a FIFO", "a is a directory", "a is a directory"] + [
        f"{name} is a FIFO" for name in "bcd"
    ]
    assert len(warnings._said) == 2


# --- the benchmark cache and the reference marker -------------------------------------------
def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("name", sorted(SPECIAL))
def test_a_cache_that_is_not_a_regular_file_is_a_miss_with_one_warning(
    tmp_path: Path, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    make, what = SPECIAL[name]
    path = make(tmp_path / "benchmark.json")
    with caplog.at_level(logging.WARNING, "pyworker.lifecycle.benchmark"):
        for _ in range(3):  # at start, then at each readiness pass
            assert read_cache(path, "key") is None
        write_cache(path, BenchmarkResult(12.5, key="key"), None)
        read_cache(path, "key")
    limit = f"larger than {MAX_CACHE_BYTES} bytes"
    said = what if name != "huge file" else limit
    assert _warnings(caplog) == [f"benchmark cache {path} is {said}: not used"]
    if name == "directory":
        assert path.is_dir() and list(path.iterdir()) == []  # left alone, never written into
    elif name == "FIFO":
        assert stat.S_ISFIFO(path.lstat().st_mode)  # left alone
    else:
        assert not path.is_symlink() and stat.S_ISREG(path.lstat().st_mode)  # replaced
        cached = read_cache(path, "key")
        assert cached is not None and cached.perf == 12.5


def test_the_cache_and_the_marker_are_never_written_through_a_symlink(tmp_path: Path) -> None:
    victims = tmp_path / "elsewhere"
    victims.mkdir()
    for name in ("cache", "marker"):
        (victims / name).write_text(f"the {name}'s target, untouched")
    path, marker = tmp_path / "benchmark.json", tmp_path / ".has_benchmark"
    path.symlink_to(victims / "cache")
    marker.symlink_to(victims / "marker")
    write_cache(path, BenchmarkResult(12.5, key="key"), marker)
    for name in ("cache", "marker"):
        assert (victims / name).read_text() == f"the {name}'s target, untouched"
    assert marker.read_text() == "12.5" and not marker.is_symlink()
    cached = read_cache(path, "key")
    assert cached is not None and cached.perf == 12.5


@pytest.mark.parametrize("make", [fifo, folder], ids=["FIFO", "directory"])
def test_a_marker_that_is_a_fifo_or_a_directory_is_left_alone_with_one_warning(
    tmp_path: Path, make: Any, caplog: pytest.LogCaptureFixture
) -> None:
    marker = make(tmp_path / ".has_benchmark")
    with caplog.at_level(logging.WARNING, "pyworker.lifecycle.benchmark"):
        write_cache(tmp_path / "benchmark.json", BenchmarkResult(12.5, key="key"), marker)
        write_marker(marker, 12.5)  # the next start, a cache hit
    kind = "a FIFO" if make is fifo else "a directory"
    assert _warnings(caplog) == [
        f"reference marker {marker} is {kind}, not a regular file: not used"
    ]
    assert not marker.is_file()
    assert read_cache(tmp_path / "benchmark.json", "key") is not None  # the cache is written
