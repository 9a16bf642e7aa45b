"""Calling a route's function: the model when it lives in the worker's own process.

An async function runs on the event loop, in the request's task, so a client that hangs up
cancels it. A sync one runs in a bounded thread pool of its own (not asyncio's default one,
which DNS lookups and file reads share), so that a CPU-bound function never stalls health,
reports or the other routes. A thread cannot be interrupted: a request cut while its function
runs waits for it (its route's slot stays taken), one past its timeout is answered at once
and the function runs on, counted until it ends (`wait_idle`, before the model is freed).
What the function returns becomes a `FunctionAnswer`: a whole body, or chunks to stream. A
function with no answer is a `FunctionFailed`, one of upstream's errors (pyworker.upstream.errors).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncGenerator, AsyncIterator, Generator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import orjson

from pyworker import backports
from pyworker.config import HandlerResult, JSONObject, RouteFunction
from pyworker.upstream.errors import FunctionFailed

__all__ = ["FunctionAnswer", "FunctionFailed", "FunctionRunner", "encode_chunk", "is_async"]

JSON_TYPE = "application/json"
BYTES_TYPE = "application/octet-stream"
EVENT_STREAM = "text/event-stream"


@dataclass(slots=True)
class FunctionAnswer:
    """A function's answer: `body` whole, or `chunks` (already encoded) to stream."""

    status: int
    content_type: str
    body: bytes = b""
    chunks: AsyncGenerator[bytes, None] | None = None


class FunctionRunner:
    """Runs the routes' functions; sync ones on `threads` threads at most."""

    def __init__(self, threads: int) -> None:
        self._threads = threads
        self._executor: ThreadPoolExecutor | None = None
        self._busy = 0
        self._idle: asyncio.Event | None = None

    async def run(
        self,
        function: RouteFunction,
        payload: JSONObject,
        timeout: float | None,
        stream_type: str = "application/x-ndjson",
    ) -> FunctionAnswer:
        """The function's answer within `timeout`; a stream's chunks each within it.

        Raises `FunctionFailed`: 504 past `timeout`, 422 for a ValueError it raises (as a
        request hook's), 500 for another exception or a result that is not JSON-able."""
        try:
            result = await self._call(function, payload, timeout)
        except asyncio.TimeoutError:
            limit = f"took over {timeout:g} s" if timeout is not None else "timed out"
            raise FunctionFailed(504, f"the route's function {limit}") from None
        except ValueError as error:
            raise FunctionFailed(422, f"invalid payload: {error}") from error
        except Exception as error:
            name = type(error).__name__
            raise FunctionFailed(500, f"the route's function raised {name}") from error
        return self._answer(result, timeout, stream_type)

    async def collect(
        self, function: RouteFunction, payload: JSONObject, timeout: float | None
    ) -> HandlerResult:
        """The whole answer, a stream read to its end: what the benchmark times. The answer
        and then its stream each within `timeout`; a failure is an answer too (its status
        says so), as from a model server."""
        try:
            answer = await self.run(function, payload, timeout)
            if answer.chunks is None:
                return HandlerResult(answer.status, answer.body, answer.content_type)
            try:
                async with backports.timeout(timeout):
                    body = b"".join([chunk async for chunk in answer.chunks])
            finally:
                await answer.chunks.aclose()
        except FunctionFailed as error:
            return HandlerResult(error.status, orjson.dumps({"error": error.message}))
        except asyncio.TimeoutError:
            raise
        except Exception as error:  # raised by the function's stream
            message = f"the route's function's stream raised {type(error).__name__}"
            return HandlerResult(500, orjson.dumps({"error": message}))
        return HandlerResult(answer.status, body, answer.content_type)

    def close(self) -> None:
        """Stop taking work; threads still running finish on their own."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def _call(
        self, function: RouteFunction, payload: JSONObject, timeout: float | None
    ) -> Any:
        if not is_async(function):
            result = await self._in_thread(timeout, function, payload)
            if not inspect.isawaitable(result):
                return result
        else:
            result = function(payload)
            if not inspect.isawaitable(result):
                return result  # an async generator: streamed
        async with backports.timeout(timeout):
            return await result

    async def _in_thread(self, timeout: float | None, function: Any, *arguments: Any) -> Any:
        """`function(*arguments)` in the pool. Past `timeout` the caller gets TimeoutError at
        once and the thread runs on; a caller cancelled (its client gone, the drain's cut)
        waits for the thread, so that its route's slot (one at a time on a fifo route) and
        the drain account for the work still running."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._threads, thread_name_prefix="function")
        running = self._executor.submit(function, *arguments)
        self._track(running)
        waited = asyncio.wrap_future(running)
        try:
            done, _ = await asyncio.wait({waited}, timeout=timeout)
        except asyncio.CancelledError:
            if not running.cancel():
                await asyncio.wait({waited})
            raise
        if not done:
            raise asyncio.TimeoutError
        return waited.result()

    def _track(self, running: Future[Any]) -> None:
        """Count the calls in the pool (queued or running) until each ends."""
        loop = asyncio.get_running_loop()
        if self._idle is None:
            self._idle = asyncio.Event()
        self._busy += 1
        self._idle.clear()

        def ended() -> None:
            self._busy -= 1
            if not self._busy and self._idle is not None:
                self._idle.set()

        running.add_done_callback(lambda _: loop.call_soon_threadsafe(ended))

    async def wait_idle(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds until no sync function runs; True if none does."""
        if self._idle is None or not self._busy:
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def _answer(self, result: Any, timeout: float | None, stream_type: str) -> FunctionAnswer:
        if isinstance(result, HandlerResult):
            return FunctionAnswer(result.status, result.content_type, bytes(result.body))
        if isinstance(result, bytes | bytearray | memoryview):
            return FunctionAnswer(200, BYTES_TYPE, bytes(result))
        if hasattr(result, "__aiter__"):
            chunks = self._stream(result, timeout, stream_type)
            return FunctionAnswer(200, stream_type, chunks=chunks)
        if inspect.isgenerator(result):
            chunks = self._stream(self._threaded(result), timeout, stream_type)
            return FunctionAnswer(200, stream_type, chunks=chunks)
        try:
            return FunctionAnswer(200, JSON_TYPE, orjson.dumps(result))
        except TypeError as error:
            raise FunctionFailed(
                500, f"the route's function returned {type(result).__name__}, not JSON: {error}"
            ) from None

    async def _threaded(self, generator: Generator[Any, Any, Any]) -> AsyncGenerator[Any, None]:
        """A sync generator's items, each made in the pool."""
        done = object()
        try:
            while (item := await self._in_thread(None, next, generator, done)) is not done:
                yield item
        finally:
            with contextlib.suppress(ValueError):  # still running in its thread: it ends there
                generator.close()

    async def _stream(
        self, chunks: AsyncIterator[Any], timeout: float | None, stream_type: str
    ) -> AsyncGenerator[bytes, None]:
        iterator = chunks.__aiter__()
        try:
            while True:
                async with backports.timeout(timeout):
                    try:
                        chunk = await iterator.__anext__()
                    except StopAsyncIteration:
                        return
                encoded = encode_chunk(chunk, stream_type)
                if encoded:
                    yield encoded
        finally:
            closing = getattr(iterator, "aclose", None)
            if closing is not None:
                await closing()


def is_async(function: object) -> bool:
    """Whether calling `function` gives a coroutine or an async iterator (run on the loop)."""
    call = getattr(function, "__call__", None)  # noqa: B004 (an object with an async __call__)
    return (
        inspect.iscoroutinefunction(function)
        or inspect.isasyncgenfunction(function)
        or inspect.iscoroutinefunction(call)
        or inspect.isasyncgenfunction(call)
    )


def encode_chunk(chunk: Any, stream_type: str) -> bytes:
    """Bytes and text as they are; anything else as one JSON line (an SSE event)."""
    if isinstance(chunk, bytes | bytearray | memoryview):
        return bytes(chunk)
    if isinstance(chunk, str):
        return chunk.encode()
    try:
        document = orjson.dumps(chunk)
    except TypeError as error:
        raise FunctionFailed(500, f"a streamed chunk is not JSON: {error}") from None
    if stream_type == EVENT_STREAM:
        return b"data: " + document + b"\n\n"
    return document + b"\n"
