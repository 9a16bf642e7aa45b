"""Load-test a `tgi` endpoint the way clients use it: route each request, then send it.

    python -m workers.tgi.load --autoscaler http://127.0.0.1:8081 --requests 200 \
        --concurrency 16 --stream
    python -m workers.tgi.load --worker http://127.0.0.1:3000 --requests 50   # UNSECURED

Run from the repository root. Payloads cycle through the worker's shipped dataset
(benchmark.jsonl) unless `--dataset` names another JSONL file. Tokens are counted from each
answer's `details.generated_tokens`, so the tokens/s printed is what TGI really generated;
streams also time the first token.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from pyworker.commands.routing import route, unsigned_auth_data
from workers.tgi.client import estimated_cost

DATASET = Path(__file__).resolve().parent / "benchmark.jsonl"
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=600, sock_read=120)
MAX_REQUESTS = 1_000_000


@dataclass(slots=True)
class Sample:
    seconds: float
    first_token: float | None
    tokens: int


@dataclass(slots=True)
class Totals:
    samples: list[Sample] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)


def read_dataset(path: Path) -> list[dict[str, Any]]:
    payloads = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for payload in payloads:
        payload.setdefault("parameters", {})["details"] = True
        payload["parameters"].pop("decoder_input_details", None)  # refused when streaming
    if not payloads:
        raise ValueError(f"{path} holds no payloads")
    return payloads


async def one(
    session: aiohttp.ClientSession, auth_data: dict[str, Any], payload: dict[str, Any], stream: bool
) -> Sample:
    url = str(auth_data["url"]).rstrip("/") + ("/generate_stream" if stream else "/generate")
    started = time.monotonic()
    first: float | None = None
    tokens = 0
    envelope = {"auth_data": auth_data, "payload": payload}
    async with session.post(url, json=envelope, timeout=REQUEST_TIMEOUT) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}")
        if stream:
            async for raw in response.content:
                if not raw.startswith(b"data:"):
                    continue
                first = time.monotonic() - started if first is None else first
                details = json.loads(raw[5:]).get("details")
                tokens = details["generated_tokens"] if details else tokens
        else:
            tokens = (await response.json())["details"]["generated_tokens"]
    return Sample(time.monotonic() - started, first, tokens)


async def run(arguments: argparse.Namespace) -> Totals:
    payloads: Iterator[dict[str, Any]] = itertools.cycle(read_dataset(arguments.dataset))
    totals = Totals()
    remaining = iter(range(min(arguments.requests, MAX_REQUESTS)))
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client() -> None:
            for _ in remaining:
                payload = next(payloads)
                try:
                    if arguments.worker:
                        auth_data = unsigned_auth_data(arguments.worker)
                    else:
                        auth_data = await route(
                            session,
                            arguments.autoscaler.rstrip("/"),
                            arguments.endpoint,
                            arguments.api_key,
                            estimated_cost(payload),
                        )
                    totals.samples.append(await one(session, auth_data, payload, arguments.stream))
                except (aiohttp.ClientError, TimeoutError, RuntimeError, KeyError) as error:
                    totals.failures[str(error) or error.__class__.__name__] += 1

        await asyncio.gather(*(client() for _ in range(arguments.concurrency)))
    return totals


def report(totals: Totals, seconds: float) -> None:
    samples = totals.samples
    tokens = sum(sample.tokens for sample in samples)
    print(f"{len(samples)} ok, {sum(totals.failures.values())} failed in {seconds:.1f} s")
    print(f"{len(samples) / seconds:.2f} requests/s, {tokens / seconds:.1f} generated tokens/s")
    if len(samples) >= 2:
        latencies = sorted(sample.seconds for sample in samples)
        quantiles = statistics.quantiles(latencies, n=100)
        print(f"latency p50 {quantiles[49]:.3f} s, p99 {quantiles[98]:.3f} s")
    firsts = [sample.first_token for sample in samples if sample.first_token is not None]
    if firsts:
        print(f"first token median {statistics.median(firsts):.3f} s")
    for reason, count in totals.failures.most_common(5):
        print(f"  {count} x {reason}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Load-test a tgi endpoint.")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--autoscaler", help="autoscaler base URL, e.g. http://127.0.0.1:8081")
    target.add_argument("--worker", help="an UNSECURED worker's URL, skipping the autoscaler")
    parser.add_argument("--endpoint", default="tgi")
    parser.add_argument("--api-key", default="")
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--stream", action="store_true", help="use /generate_stream")
    parser.add_argument("--dataset", type=Path, default=DATASET, help="JSONL of TGI payloads")
    arguments = parser.parse_args(argv)
    if arguments.requests < 1 or arguments.concurrency < 1:
        parser.error("--requests and --concurrency must be at least 1")
    started = time.monotonic()
    totals = asyncio.run(run(arguments))
    report(totals, time.monotonic() - started)
    return 0 if totals.samples else 1


if __name__ == "__main__":
    sys.exit(main())
