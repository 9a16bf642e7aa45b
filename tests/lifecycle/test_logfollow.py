"""The log follower against real files: appearance, rotation, truncation and hostile content."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tracemalloc
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from pyworker.lifecycle import logfollow, regular_files
from pyworker.lifecycle.logfollow import (
    FollowState,
    LineKind,
    LogEvent,
    LogFollower,
    LogPattern,
)

T = TypeVar("T")
TIMEOUT = 5.0
POLL = 0.01

PATTERNS = (
    LogPattern(LineKind.LOADED, "model loaded"),
    LogPattern(LineKind.ERROR, "CUDA out of memory"),
    LogPattern(LineKind.ERROR, r"warn(ing)?: retry \d+", regex=True, fatal=False),
    LogPattern(LineKind.INFO, "INFO"),
)


def append(path: Path, data: bytes) -> None:
    with path.open("ab") as handle:
        handle.write(data)


async def until(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """Poll `condition` until it holds; fail the test at the deadline."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail("condition not met before the deadline")
        await asyncio.sleep(POLL)


async def next_item(iterator: AsyncIterator[T]) -> T:
    return await asyncio.wait_for(anext(iterator), TIMEOUT)


@contextlib.asynccontextmanager
async def following(follower: LogFollower) -> AsyncIterator[AsyncGenerator[str, None]]:
    lines = follower.lines()
    try:
        yield lines
    finally:
        await lines.aclose()


@contextlib.asynccontextmanager
async def following_events(follower: LogFollower) -> AsyncIterator[AsyncGenerator[LogEvent, None]]:
    events = follower.events()
    try:
        yield events
    finally:
        await events.aclose()


def make_follower(path: Path, **options: object) -> LogFollower:
    return LogFollower(path, PATTERNS, poll_interval=POLL, **options)  # type: ignore[arg-type]


async def test_waits_for_the_file_to_appear(tmp_path: Path) -> None:
    path = tmp_path / "model.log"
    follower = make_follower(path)
    async with following_events(follower) as events:
        pending = asyncio.ensure_future(next_item(events))
        await until(lambda: follower.stats.state is FollowState.WAITING)
        assert not pending.done()
        path.write_bytes(b"INFO starting\nall weights read, model loaded\n")
        first = await pending
        second = await next_item(events)
    assert (first.kind, first.line) == (LineKind.INFO, "INFO starting")
    assert (second.kind, second.line) == (LineKind.LOADED, "all weights read, model loaded")
    assert not second.fatal
    assert follower.stats.matches[LineKind.LOADED] == 1
    assert follower.stats.state is FollowState.STOPPED


async def test_a_special_file_at_the_path_gets_one_warning_per_change_and_never_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    looks = 0
    open_regular = regular_files.open_regular

    def counted(*arguments: Any, **options: Any) -> Any:
        nonlocal looks
        looks += 1
        return open_regular(*arguments, **options)

    async def several_looks() -> None:
        seen = looks
        await until(lambda: looks >= seen + 5)

    monkeypatch.setattr(logfollow, "open_regular", counted)
    path = tmp_path / "model.log"
    os.mkfifo(path)  # opened for reading, it would wait for a writer
    follower = make_follower(path)
    with caplog.at_level(logging.WARNING, "pyworker.lifecycle.logfollow"):
        async with following(follower) as lines:
            first = asyncio.ensure_future(anext(lines))
            await several_looks()
            path.unlink()
            path.mkdir()
            await several_looks()
            path.rmdir()
            path.symlink_to("/dev/zero")  # read, it never ends
            await several_looks()
            assert follower.stats.state is FollowState.WAITING and not first.done()
            real = tmp_path / "model.real"
            real.write_text("model loaded\n")
            path.unlink()
            path.symlink_to(real)  # a link to a regular file is followed
            assert await asyncio.wait_for(first, TIMEOUT) == "model loaded"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    waiting = "waiting for a regular file there"
    assert warnings == [
        f"log {path} is a FIFO, not a regular file; {waiting}",
        f"log {path} is a directory, not a regular file; {waiting}",
        f"log {path} is a character device, not a regular file; {waiting}",
    ]
    assert follower.stats.bytes_read == len("model loaded\n")


async def test_follows_lines_written_after_start(tmp_path: Path) -> None:
    path = tmp_path / "model.log"
    path.write_bytes(b"booting\n")
    follower = make_follower(path)
    async with following(follower) as lines:
        assert await next_item(lines) == "booting"
        append(path, b"second\r\nthird\rfourth\n\n")
        assert [await next_item(lines) for _ in range(3)] == ["second", "third", "fourth"]
    assert follower.stats.lines_read == 4


async def test_from_start_false_skips_existing_content(tmp_path: Path) -> None:
    path = tmp_path / "model.log"
    path.write_bytes(b"model loaded (an earlier run)\n")
    follower = make_follower(path, from_start=False)
    async with following(follower) as lines:
        pending = asyncio.ensure_future(next_item(lines))
        await until(lambda: follower.stats.state is FollowState.FOLLOWING)
        append(path, b"fresh\n")
        assert await pending == "fresh"


async def test_partial_line_is_held_until_completed(tmp_path: Path) -> None:
    path = tmp_path / "model.log"
    path.write_bytes(b"")
    follower = make_follower(path)
    async with following_events(follower) as events:
        pending = asyncio.ensure_future(next_item(events))
        append(path, b"model lo")
        await until(lambda: follower.stats.bytes_read == 8)
        assert not pending.done()
        append(path, b"aded\n")
        event = await pending
    assert (event.kind, event.line) == (LineKind.LOADED, "model loaded")


async def test_rotation_keeps_the_old_files_tail(tmp_path: Path) -> None:
    path = tmp_path / "model.log"
    path.write_bytes(b"first\n")
    follower = make_follower(path)
    async with following(follower) as lines:
        assert await next_item(lines) == "first"
        # The writer adds more to the old file, which is then renamed before the follower has
        # necessarily read it; the new file starts at once.
        append(path, b"old tail\nold partial")
        path.rename(tmp_path / "model.log.1")
        path.write_bytes(b"new file\n")
        received = [await next_item(lines) for _ in range(3)]
        assert received == ["old tail", "old partial", "new file"]
        append(path, b"more\n")
        assert await next_item(lines) == "more"
    assert follower.stats.rotations == 1


async def test_rotation_by_delete_and_recreate(tmp_path: Path) -> None:
    path = tmp_path / "model.log"
    path.write_bytes(b"first\n")
    follower = make_follower(path)
    async with following(follower) as lines:
        assert await next_item(lines) == "first"
        path.unlink()  # the follower keeps the deleted file open, so no inode can be reused
        path.write_bytes(b"recreated\n")
        assert await next_item(lines) == "recreated"
    assert follower.stats.rotations == 1


async def test_copytruncate_restarts_at_the_beginning(tmp_path: Path) -> None:
    path = tmp_path / "model.log"
    path.write_bytes(b"one line\ntwo line\n")
    follower = make_follower(path)
    async with following(follower) as lines:
        assert [await next_item(lines) for _ in range(2)] == ["one line", "two line"]
        (tmp_path / "model.log.1").write_bytes(path.read_bytes())
        os.truncate(path, 0)
        append(path, b"three\n")
        assert await next_item(lines) == "three"
    assert follower.stats.truncations == 1
    assert follower.stats.rotations == 0


async def test_a_truncation_written_past_the_old_end_before_a_poll_is_seen(tmp_path: Path) -> None:
    path = tmp_path / "model.log"
    path.write_bytes(b"old line one\n")
    follower = make_follower(path)
    async with following(follower) as lines:
        assert await next_item(lines) == "old line one"
        with path.open("r+b") as handle:  # truncated and longer than before, in one go
            handle.truncate(0)
            handle.write(b"new line one\nnew line two\n")
        assert [await next_item(lines) for _ in range(2)] == ["new line one", "new line two"]
    assert follower.stats.truncations == 1


async def test_bytes_that_are_not_utf8_are_replaced(tmp_path: Path) -> None:
    path = tmp_path / "model.log"
    path.write_bytes(b"bad \xff\xfe bytes, model loaded\n\x00\x00INFO after nul\n")
    follower = make_follower(path)
    async with following_events(follower) as events:
        loaded = await next_item(events)
        info = await next_item(events)
    assert loaded.kind is LineKind.LOADED
    assert loaded.line == "bad \ufffd\ufffd bytes, model loaded"
    assert info.line == "INFO after nul"


async def test_a_10_mb_line_is_cut_and_memory_stays_bounded(tmp_path: Path) -> None:
    path = tmp_path / "model.log"
    with path.open("wb") as handle:
        for _ in range(160):
            handle.write(b"x" * 65536)
        handle.write(b" model loaded never seen\nmodel loaded\n")
    follower = make_follower(path)
    tracemalloc.start()
    try:
        async with following(follower) as lines:
            cut = await next_item(lines)
            after = await next_item(lines)
            _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert cut == "x" * 65536
    assert after == "model loaded"
    assert follower.stats.lines_cut == 1
    assert peak < 4 * 1024 * 1024, f"peak {peak} bytes while following a 10 MB line"


async def test_max_line_applies_to_complete_lines_too(tmp_path: Path) -> None:
    path = tmp_path / "model.log"
    path.write_bytes(b"0123456789abcdef\nshort\n")
    follower = make_follower(path, max_line=10)
    async with following(follower) as lines:
        assert await next_item(lines) == "0123456789"
        assert await next_item(lines) == "short"
    assert follower.stats.lines_cut == 1


async def test_substring_and_regex_patterns(tmp_path: Path) -> None:
    path = tmp_path / "model.log"
    path.write_bytes(
        b"warning: retry 3 of 5\n"
        b"warning: retry x\n"
        b"model loaded but CUDA out of memory\n"
        b"nothing here\n"
        b"model loaded\n"
    )
    follower = make_follower(path)
    async with following_events(follower) as events:
        received = [await next_item(events) for _ in range(3)]
    assert [(event.kind, event.fatal) for event in received] == [
        (LineKind.ERROR, False),
        (LineKind.ERROR, True),  # an error wins over *loaded* on the same line
        (LineKind.LOADED, False),
    ]
    assert follower.stats.matches == {LineKind.LOADED: 1, LineKind.ERROR: 2, LineKind.INFO: 0}
    assert follower.stats.to_dict()["matches"] == {"loaded": 1, "error": 2, "info": 0}


def test_pattern_matching_rules() -> None:
    literal = LogPattern(LineKind.INFO, "[ready]")
    assert literal.match("server [ready] now")
    assert not literal.match("r")
    regex = LogPattern(LineKind.LOADED, r"loaded in \d+s$", regex=True)
    assert regex.match("model loaded in 12s")
    assert not regex.match("model loaded in xs")
    assert not LogPattern(LineKind.INFO, "info", fatal=True).is_fatal
    with pytest.raises(ValueError, match="invalid loaded regex"):
        LogPattern(LineKind.LOADED, "(unclosed", regex=True)
    with pytest.raises(ValueError, match="empty"):
        LogPattern(LineKind.ERROR, "")


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_cancellation_closes_the_file(tmp_path: Path) -> None:
    path = tmp_path / "model.log"
    path.write_bytes(b"INFO one\n")
    follower = make_follower(path)
    before = open_descriptors()
    seen: list[LogEvent] = []

    async def consume() -> None:
        async for event in follower.events():
            seen.append(event)

    task = asyncio.create_task(consume())
    await until(lambda: len(seen) == 1)
    assert open_descriptors() == before + 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert open_descriptors() == before
    assert follower.stats.state is FollowState.STOPPED


async def test_stop_ends_the_iteration(tmp_path: Path) -> None:
    follower = make_follower(tmp_path / "never.log")
    events = follower.events()
    pending = asyncio.ensure_future(next_item(events))
    await until(lambda: follower.stats.state is FollowState.WAITING)
    follower.stop()
    with pytest.raises(StopAsyncIteration):
        await pending


async def test_one_iteration_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "model.log"
    path.write_bytes(b"line\n")
    follower = make_follower(path)
    async with following(follower) as lines:
        assert await next_item(lines) == "line"
        with pytest.raises(RuntimeError, match="already following"):
            await next_item(follower.lines())
