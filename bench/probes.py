"""Measurements made from this process: time to first chunk, and a wall of slow requests."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

import aiohttp
from yarl import URL

from pyworker import backports

HEADERS = {"Content-Type": "application/json"}


async def first_chunk_times(url: str, body: bytes, samples: int) -> list[float]:
    """Milliseconds from sending a streamed request to its first chunk, one request at a time."""
    times: list[float] = []
    timeout = aiohttp.ClientTimeout(total=30.0)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for _ in range(samples):
            started = time.perf_counter()
            async with session.post(url, data=body, headers=HEADERS) as response:
                if response.status != 200:
                    raise RuntimeError(f"stream through {url} answered {response.status}")
                await response.content.readany()
                times.append((time.perf_counter() - started) * 1000.0)
                await response.read()
    return times


@dataclass(slots=True)
class SlowBatch:
    count: int
    succeeded: int
    model_seconds: float
    max_seconds: float
    wall_seconds: float
    sent_seconds: float
    """How long this client took to have every request written: its own share of the wait."""

    @property
    def max_ratio(self) -> float:
        return self.max_seconds / self.model_seconds


def _raw_request(url: URL, body: bytes) -> bytes:
    head = (
        f"POST {url.raw_path_qs} HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


async def _raw_exchange(host: str, port: int, request: bytes, timeout: float) -> tuple[int, float]:
    """One request on its own connection: the status code (0 if it failed), and when it was
    written."""
    writer: asyncio.StreamWriter | None = None
    written = math.inf
    try:
        async with backports.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            written = time.perf_counter()
            status_line = await reader.readline()
            await reader.read()  # `Connection: close`: the answer ends when the server closes
    except (OSError, asyncio.TimeoutError):
        return 0, written
    finally:
        if writer is not None:
            writer.close()
    parts = status_line.split()
    return (int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0), written


async def slow_batch(url: str, body: bytes, count: int, model_seconds: float) -> SlowBatch:
    """`count` requests at once, each on its own fresh connection, as many clients would.

    A bare asyncio client (no aiohttp) keeps this process's own cost per request low, since
    every millisecond it spends sending the last requests counts as their latency.
    """
    target = URL(url)
    host, port = target.host or "127.0.0.1", target.port or 80
    request = _raw_request(target, body)
    timeout = model_seconds * 10 + 30.0
    longest = 0.0
    last_written = 0.0
    succeeded = 0

    async def one() -> None:
        nonlocal longest, last_written, succeeded
        began = time.perf_counter()
        status, written = await _raw_exchange(host, port, request, timeout)
        longest = max(longest, time.perf_counter() - began)
        if status == 200:
            succeeded += 1
            last_written = max(last_written, written)

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(count)))
    wall = time.perf_counter() - started
    return SlowBatch(count, succeeded, model_seconds, longest, wall, last_written - started)
