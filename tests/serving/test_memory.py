"""Memory given back after bursts: a trim asked for while one runs is not lost."""

from __future__ import annotations

import asyncio
import threading

import pytest

from pyworker.serving import memory
from tests.conftest import wait_until


async def test_buffers_freed_while_a_trim_runs_get_a_trim_of_their_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if memory._LIBC is None:
        pytest.skip("not glibc: trimming is a no-op")
    started, release = threading.Event(), threading.Event()
    calls: list[int] = []

    def slow_trim() -> bool:
        calls.append(1)
        started.set()
        release.wait(10)
        return True

    monkeypatch.setattr(memory, "trim", slow_trim)
    trimmer = memory.Trimmer(delay=0.01)
    trimmer.trim_soon()
    assert await asyncio.to_thread(started.wait, 10)
    trimmer.trim_soon()  # more buffers freed while the first trim runs
    asked = trimmer._scheduled
    # Its turn comes while the first still runs: it is put off, not dropped.
    await wait_until(lambda: trimmer._scheduled not in (None, asked))
    release.set()
    await wait_until(lambda: len(calls) == 2, timeout=10)
    assert trimmer.trims == 2
