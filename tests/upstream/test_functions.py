"""Route functions called by `FunctionRunner`: answers, streams, timeouts, the bounded pool."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from pyworker.config import HandlerResult
from pyworker.upstream.functions import FunctionFailed, FunctionRunner, encode_chunk


async def test_a_slow_function_is_a_504_naming_the_limit() -> None:
    async def slow(payload: dict[str, Any]) -> dict[str, Any]:
        await asyncio.Event().wait()
        return {}

    runner = FunctionRunner(1)
    with pytest.raises(FunctionFailed) as failed:
        await runner.run(slow, {}, 0.05)
    assert failed.value.status == 504 and "0.05 s" in failed.value.message


async def test_sync_functions_never_run_more_at_once_than_the_pool_has_threads() -> None:
    running = 0
    most = 0
    lock = threading.Lock()

    def work(payload: dict[str, Any]) -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        threading.Event().wait(0.02)  # stays in its thread long enough for others to try
        with lock:
            running -= 1
        return int(payload["n"])

    runner = FunctionRunner(2)
    try:
        answers = await asyncio.gather(*(runner.run(work, {"n": n}, None) for n in range(8)))
    finally:
        runner.close()
    assert [answer.body for answer in answers] == [str(n).encode() for n in range(8)]
    assert 1 <= most <= 2  # 8 asked at once; an unbounded pool would run them all


async def test_a_stream_is_collected_whole_for_the_benchmark_and_its_generator_closed() -> None:
    closed = threading.Event()

    def words(payload: dict[str, Any]) -> Iterator[dict[str, str]]:
        try:
            yield {"text": "a"}
            yield {"text": "b"}
        finally:
            closed.set()

    runner = FunctionRunner(1)
    result = await runner.collect(words, {}, 5.0)
    assert result == HandlerResult(200, b'{"text":"a"}\n{"text":"b"}\n', "application/x-ndjson")
    assert closed.is_set()


async def test_a_stream_that_breaks_is_a_failed_benchmark_request() -> None:
    async def broken(payload: dict[str, Any]) -> AsyncIterator[bytes]:
        yield b"first"
        raise RuntimeError("boom")

    result = await FunctionRunner(1).collect(broken, {}, 5.0)
    assert result.status == 500 and b"RuntimeError" in result.body


def test_chunks_are_sent_as_they_are_or_as_json_lines_or_events() -> None:
    assert encode_chunk(b"\x00", "application/x-ndjson") == b"\x00"
    assert encode_chunk("text", "text/event-stream") == b"text"
    assert encode_chunk({"a": 1}, "application/x-ndjson") == b'{"a":1}\n'
    assert encode_chunk({"a": 1}, "text/event-stream") == b'data: {"a":1}\n\n'
    with pytest.raises(FunctionFailed, match="not JSON"):
        encode_chunk(object(), "application/x-ndjson")


async def test_a_sync_function_past_the_benchmark_timeout_fails_at_once() -> None:
    release = threading.Event()

    def hold(payload: dict[str, Any]) -> dict[str, Any]:
        release.wait(30)
        return {}

    runner = FunctionRunner(1)
    try:
        result = await asyncio.wait_for(runner.collect(hold, {}, 0.05), 10)
        assert result.status == 504
    finally:
        release.set()
        runner.close()
