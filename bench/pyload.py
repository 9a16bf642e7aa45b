"""A load generator in Python, for machines without `wrk`: one process per load core.

A Python client costs about as much CPU per request as the proxy it measures, so on one load
core it cannot saturate a proxy on another: its requests/s are a floor, not the proxy's ceiling.
Run by `bench.load`: `python -m bench.pyload --url U --body-file F --connections 64 --seconds 5`
(closed loop) or with `--rate R` (open loop on a fixed schedule); prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass, field

import aiohttp
import orjson

HEADERS = {"Content-Type": "application/json"}
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=30.0)
MAX_SAMPLES = 1_000_000


@dataclass
class Tally:
    requests: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    def record(self, started: float, ok: bool) -> None:
        self.requests += 1
        if not ok:
            self.errors += 1
        if len(self.latencies_ms) < MAX_SAMPLES:
            self.latencies_ms.append((time.perf_counter() - started) * 1000.0)


async def _one(
    session: aiohttp.ClientSession, url: str, body: bytes, started: float, tally: Tally
) -> None:
    ok = False
    try:
        async with session.post(url, data=body, headers=HEADERS) as response:
            await response.read()
            ok = response.status < 400
    except (aiohttp.ClientError, asyncio.TimeoutError):
        ok = False
    tally.record(started, ok)


async def closed_loop(url: str, body: bytes, connections: int, seconds: float) -> Tally:
    """`connections` clients, each sending its next request as soon as it has an answer."""
    tally = Tally()
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=REQUEST_TIMEOUT) as session:

        async def client() -> None:
            while time.perf_counter() < deadline:
                await _one(session, url, body, time.perf_counter(), tally)

        await asyncio.gather(*(client() for _ in range(connections)))
    return tally


async def open_loop(url: str, body: bytes, rate: float, seconds: float) -> Tally:
    """Requests on a fixed schedule, latency counted from the scheduled time (no omission)."""
    tally = Tally()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=REQUEST_TIMEOUT) as session:
        start = time.perf_counter()
        total = int(rate * seconds)
        tasks: set[asyncio.Task[None]] = set()
        for index in range(total):
            scheduled = start + index / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(_one(session, url, body, scheduled, tally))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
    return tally


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--body-file", required=True)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rate", type=float, default=None)
    arguments = parser.parse_args()
    with open(arguments.body_file, "rb") as file:
        body = file.read()
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass
    started = time.perf_counter()
    if arguments.rate:
        tally = asyncio.run(open_loop(arguments.url, body, arguments.rate, arguments.seconds))
    else:
        tally = asyncio.run(
            closed_loop(arguments.url, body, arguments.connections, arguments.seconds)
        )
    elapsed = time.perf_counter() - started
    result = {
        "requests": tally.requests,
        "errors": tally.errors,
        "seconds": elapsed,
        "latencies_ms": tally.latencies_ms,
    }
    sys.stdout.buffer.write(orjson.dumps(result) + b"\n")


if __name__ == "__main__":
    main()
