"""Load-test an `openai` endpoint the way clients use it: route each request, then send it.

    python workers/openai/load.py --autoscaler http://127.0.0.1:8081 --requests 200 \
        --concurrency 16 --stream
    python workers/openai/load.py --worker http://127.0.0.1:3000 --requests 50   # UNSECURED

Payloads come from the worker's shipped dataset (benchmark.jsonl) unless `--dataset` names
another JSONL file. Tokens are counted from each answer's `usage` (streams ask for it with
`stream_options.include_usage`), so the tokens/s printed is what the model really produced.
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

DATASET = Path(__file__).resolve().parent / "benchmark.jsonl"
ROUTE_TIMEOUT = aiohttp.ClientTimeout(total=10)
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=600, sock_read=120)
MAX_ROUTE_ATTEMPTS = 60
MAX_REQUESTS = 1_000_000


@dataclass(slots=True)
class Sample:
    status: int
    seconds: float
    first_byte: float
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(slots=True)
class Totals:
    samples: list[Sample] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)


def read_dataset(path: Path) -> list[dict[str, Any]]:
    items = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    payloads = [item for item in items if isinstance(item, dict)]
    if not payloads:
        raise ValueError(f"{path} holds no JSON objects")
    return payloads


def cost_of(payload: dict[str, Any]) -> float:
    return len(str(payload.get("prompt", ""))) / 4 + float(payload.get("max_tokens", 16))


class Target:
    """Where requests go: through an autoscaler's `/route/`, or straight to one worker."""

    def __init__(self, arguments: argparse.Namespace) -> None:
        self.autoscaler = (arguments.autoscaler or "").rstrip("/")
        self.worker = (arguments.worker or "").rstrip("/")
        self.endpoint = arguments.endpoint
        self.api_key = arguments.api_key

    async def auth_data(self, session: aiohttp.ClientSession, cost: float) -> dict[str, Any]:
        if self.worker:
            fields = {"cost": cost, "endpoint": "local", "reqnum": 0, "request_idx": 0}
            return fields | {"signature": "", "url": self.worker}
        body: dict[str, Any] = {"endpoint": self.endpoint, "api_key": self.api_key, "cost": cost}
        for _ in range(MAX_ROUTE_ATTEMPTS):
            async with session.post(
                self.autoscaler + "/route/", json=body, timeout=ROUTE_TIMEOUT
            ) as response:
                response.raise_for_status()
                answer: dict[str, Any] = await response.json()
            if "url" in answer:
                return answer
            body["request_idx"] = answer.get("request_idx", 0)
            await asyncio.sleep(1.0)
        raise RuntimeError("no worker became ready")


async def one_request(
    session: aiohttp.ClientSession, target: Target, payload: dict[str, Any], stream: bool
) -> Sample:
    if stream:
        payload = payload | {"stream": True, "stream_options": {"include_usage": True}}
    auth_data = await target.auth_data(session, cost_of(payload))
    url = str(auth_data["url"]).rstrip("/") + "/v1/completions"
    started = time.monotonic()
    first_byte = 0.0
    usage: dict[str, Any] = {}
    envelope = {"auth_data": auth_data, "payload": payload}
    async with session.post(url, json=envelope, timeout=REQUEST_TIMEOUT) as response:
        async for raw in response.content:
            first_byte = first_byte or time.monotonic() - started
            line = raw.strip()
            if line.startswith(b"data:"):
                line = line[5:].strip()
            if not line or line == b"[DONE]" or response.status != 200:
                continue
            try:
                document = json.loads(line)
            except ValueError:
                continue
            if isinstance(document, dict) and isinstance(document.get("usage"), dict):
                usage = document["usage"]
    return Sample(
        response.status,
        time.monotonic() - started,
        first_byte,
        int(usage.get("prompt_tokens", 0)),
        int(usage.get("completion_tokens", 0)),
    )


async def run_load(arguments: argparse.Namespace) -> Totals:
    payloads = read_dataset(Path(arguments.dataset))
    if arguments.model:
        payloads = [payload | {"model": arguments.model} for payload in payloads]
    target = Target(arguments)
    totals = Totals()
    queue = itertools.islice(itertools.cycle(payloads), min(arguments.requests, MAX_REQUESTS))

    async def client(session: aiohttp.ClientSession) -> None:
        for payload in queue:  # shared iterator: each payload is taken once
            try:
                sample = await one_request(session, target, payload, arguments.stream)
            except (aiohttp.ClientError, TimeoutError, RuntimeError) as error:
                totals.failures[error.__class__.__name__] += 1
                continue
            totals.samples.append(sample)
            if sample.status != 200:
                totals.failures[f"HTTP {sample.status}"] += 1

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.monotonic()
        await asyncio.gather(*(client(session) for _ in range(arguments.concurrency)))
        wall = time.monotonic() - started
    print_summary(totals, wall)
    return totals


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def print_summary(totals: Totals, wall: float) -> None:
    good = [sample for sample in totals.samples if sample.status == 200]
    completion = sum(sample.completion_tokens for sample in good)
    prompt = sum(sample.prompt_tokens for sample in good)
    latencies = [sample.seconds for sample in good]
    first = [sample.first_byte for sample in good]
    print(f"requests ok      {len(good)} in {wall:.2f} s ({len(good) / wall:.2f}/s)")
    print(f"failures         {dict(totals.failures) or 0}")
    print(f"tokens           {prompt} prompt + {completion} completion")
    print(f"completion tok/s {completion / wall:.1f}")
    if latencies:
        print(f"latency          p50 {statistics.median(latencies) * 1000:.0f} ms, "
              f"p95 {percentile(latencies, 0.95) * 1000:.0f} ms")  # fmt: skip
        print(f"first byte       p50 {statistics.median(first) * 1000:.0f} ms, "
              f"p95 {percentile(first, 0.95) * 1000:.0f} ms")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Load-test an openai worker endpoint.")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--autoscaler", help="autoscaler base URL, e.g. http://127.0.0.1:8081")
    target.add_argument("--worker", help="an UNSECURED worker's URL, skipping the autoscaler")
    parser.add_argument("--endpoint", default="openai", help="endpoint name at the autoscaler")
    parser.add_argument("--api-key", default="")
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--stream", action="store_true", help="stream the answers (SSE)")
    parser.add_argument("--dataset", default=str(DATASET), help="JSONL of completions payloads")
    parser.add_argument("--model", default="", help="model name, if the server checks it")
    arguments = parser.parse_args(argv)
    if arguments.requests < 1 or arguments.concurrency < 1:
        parser.error("--requests and --concurrency must be at least 1")
    totals = asyncio.run(run_load(arguments))
    return 0 if totals.samples and not totals.failures else 1


if __name__ == "__main__":
    sys.exit(main())
