"""Route functions in the worker's own process: what they cost, and /health beside CPU work.

    python -m bench.functions            # about 20 s
    python -m bench.functions --quick    # a few seconds

Starts `pyworker run` on a generated config (unsecured, off the platform) whose routes are an
async function, a sync one (in the thread pool), and a CPU-bound sync one; then prints, for
the first two, requests/s and p50/p99 latency at a fixed concurrency, and the p50/p99/max of
`GET /health` while every pool thread runs the CPU-bound function. Not a test: the figures
depend on the machine.

A pure-Python function holds the GIL while it runs, so the event loop shares the interpreter
with every such thread (it gets it back within the switch interval each time it asks, which
pyworker lowers from 5 ms to 1 ms when routes are functions): /health and reports go on,
slower the more threads spin. Code that releases the GIL (numpy, torch, a GPU kernel, I/O)
leaves the loop alone.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

CONFIG = """
from pyworker.config import RouteConfig, WorkerConfig


async def echo_async(payload):
    return {"ok": payload.get("n", 0)}


def echo_sync(payload):
    return {"ok": payload.get("n", 0)}


def spin(payload):
    total = 0
    for number in range(int(payload["loops"])):
        total += number * number
    return {"total": total}


worker = WorkerConfig(
    name="bench-functions",
    routes=[
        RouteConfig(path="/async", function=echo_async),
        RouteConfig(path="/sync", function=echo_sync),
        RouteConfig(path="/spin", function=spin),
    ],
    perf=1000.0,
    function_threads={threads},
)
"""

ENVELOPE = {
    "auth_data": {
        "cost": 1,
        "endpoint": "bench",
        "reqnum": 1,
        "request_idx": 1,
        "url": "http://127.0.0.1",
        "signature": "AAAA",
    },
}


async def start(folder: Path, threads: int) -> tuple[asyncio.subprocess.Process, str]:
    config = folder / "bench_functions.py"
    config.write_text(CONFIG.replace("{threads}", str(threads)))
    environ = dict(os.environ, UNSECURED="true", PYWORKER_LOG_LEVEL="WARNING")
    for name in ("REPORT_ADDR", "CONTAINER_ID"):
        environ.pop(name, None)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pyworker", "run", str(config), "--port", "0",
        stdout=asyncio.subprocess.PIPE, env=environ,
    )  # fmt: skip
    assert process.stdout is not None
    while line := await asyncio.wait_for(process.stdout.readline(), 30):
        if b"listening on " in line:
            return process, line.split(b"listening on ")[1].split()[0].decode()
    raise RuntimeError("the worker exited before listening")


async def ready(session: aiohttp.ClientSession, url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        async with session.get(url + "/ready") as answer:
            if answer.status == 200:
                return
        await asyncio.sleep(0.05)
    raise RuntimeError("the worker never became ready")


async def hammer(
    session: aiohttp.ClientSession, url: str, requests: int, concurrency: int
) -> tuple[float, list[float]]:
    """requests/s and each request's seconds, `concurrency` at a time."""
    latencies: list[float] = []
    left = iter(range(requests))

    async def client() -> None:
        for number in left:
            body = {**ENVELOPE, "payload": {"n": number}}
            started = time.perf_counter()
            async with session.post(url, json=body) as answer:
                await answer.read()
                assert answer.status == 200, answer.status
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return requests / (time.perf_counter() - started), latencies


async def health_beside_spin(
    session: aiohttp.ClientSession, url: str, probes: int, loops: int, threads: int
) -> list[float]:
    """/health latencies while as many requests as threads keep each on CPU work."""
    body = {**ENVELOPE, "payload": {"loops": loops}}
    spinning = [
        asyncio.ensure_future(session.post(url + "/spin", json=body)) for _ in range(threads)
    ]
    await asyncio.sleep(0.2)  # let them reach their threads
    latencies = []
    for _ in range(probes):
        started = time.perf_counter()
        async with session.get(url + "/health") as answer:
            await answer.read()
        latencies.append(time.perf_counter() - started)
        await asyncio.sleep(0.01)
    busy_to_the_end = not any(task.done() for task in spinning)
    for answer in await asyncio.gather(*spinning):
        answer.release()
    if not busy_to_the_end:
        print("  (the CPU-bound requests ended before the probes: raise --loops)")
    return latencies


def milliseconds(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def main(quick: bool, threads: int) -> None:
    requests, probes, loops = (500, 50, 20_000_000) if quick else (3000, 200, 60_000_000)
    with tempfile.TemporaryDirectory() as folder:
        process, url = await start(Path(folder), threads)
        try:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
                await ready(session, url)
                print(f"{requests} requests, 16 at a time (python {sys.version.split()[0]}):")
                for route in ("/async", "/sync"):
                    rate, latencies = await hammer(session, url + route, requests, 16)
                    print(
                        f"  {route:7} {rate:7.0f} req/s  p50 {milliseconds(latencies, 0.5):.2f} ms"
                        f"  p99 {milliseconds(latencies, 0.99):.2f} ms"
                    )
                health = await health_beside_spin(session, url, probes, loops, threads)
                print(
                    f"/health while {threads} pure-Python thread(s) spin:"
                    f" p50 {milliseconds(health, 0.5):.2f} ms"
                    f"  p99 {milliseconds(health, 0.99):.2f} ms  max {1000 * max(health):.2f} ms"
                    f"  (mean {1000 * statistics.fmean(health):.2f} ms)"
                )
        finally:
            process.terminate()
            await process.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=4, help="function_threads (default 4)")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.quick, arguments.threads))
