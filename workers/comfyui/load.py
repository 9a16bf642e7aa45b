"""Load-test a `comfyui` endpoint the way clients use it: route each workflow, then send it.

    python -m workers.comfyui.load --autoscaler http://127.0.0.1:8081 --requests 40 \
        --concurrency 4
    python -m workers.comfyui.load --worker http://127.0.0.1:3000 --requests 10  # UNSECURED

Run from the repository root. Workflows cycle through the worker's shipped dataset
(benchmark.json, a JSON list of `{"workflow": ...}` payloads) unless `--dataset` names another,
each sent with a fresh seed so that ComfyUI cannot answer it from its cache. Each worker runs
one workflow at a time: more concurrency than workers only queues.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import itertools
import json
import random
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
from workers.comfyui.client import estimated_cost, run_workflow

DATASET = Path(__file__).resolve().parent / "benchmark.json"
MAX_REQUESTS = 100_000


@dataclass(slots=True)
class Totals:
    seconds: list[float] = field(default_factory=list)
    images: int = 0
    work: float = 0.0
    failures: Counter[str] = field(default_factory=Counter)


def read_dataset(path: Path) -> list[dict[str, Any]]:
    items = json.loads(path.read_text())
    workflows = [
        item["workflow"] for item in items if isinstance(item, dict) and "workflow" in item
    ]
    if not workflows:
        raise ValueError(f"{path} holds no {{'workflow': ...}} payloads")
    return workflows


def reseeded(workflow: dict[str, Any]) -> dict[str, Any]:
    fresh = copy.deepcopy(workflow)
    for node in fresh.values():
        inputs = node.get("inputs", {})
        for key in ("seed", "noise_seed"):
            if isinstance(inputs.get(key), int):
                inputs[key] = random.randrange(2**32)
    return fresh


async def run(arguments: argparse.Namespace) -> Totals:
    workflows: Iterator[dict[str, Any]] = itertools.cycle(read_dataset(arguments.dataset))
    totals = Totals()
    remaining = iter(range(min(arguments.requests, MAX_REQUESTS)))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def client() -> None:
            for _ in remaining:
                workflow = reseeded(next(workflows))
                cost = estimated_cost(workflow)
                started = time.monotonic()
                try:
                    if arguments.worker:
                        auth_data = unsigned_auth_data(arguments.worker)
                    else:
                        auth_data = await route(
                            session,
                            arguments.autoscaler.rstrip("/"),
                            arguments.endpoint,
                            arguments.api_key,
                            cost,
                        )
                    answer = await run_workflow(session, auth_data, workflow)
                except (aiohttp.ClientError, TimeoutError, RuntimeError) as error:
                    totals.failures[str(error)[:120] or error.__class__.__name__] += 1
                    continue
                totals.seconds.append(time.monotonic() - started)
                totals.images += len(answer.get("images", []))
                totals.work += cost

        await asyncio.gather(*(client() for _ in range(arguments.concurrency)))
    return totals


def report(totals: Totals, seconds: float) -> None:
    done = len(totals.seconds)
    print(f"{done} ok, {sum(totals.failures.values())} failed in {seconds:.1f} s")
    print(
        f"{done / seconds:.3f} workflows/s, {totals.images / seconds:.3f} images/s, "
        f"{totals.work / seconds:.2f} work units (512x512 steps)/s"
    )
    if done >= 2:
        quantiles = statistics.quantiles(sorted(totals.seconds), n=100)
        print(f"latency p50 {quantiles[49]:.2f} s, p99 {quantiles[98]:.2f} s")
    for reason, count in totals.failures.most_common(5):
        print(f"  {count} x {reason}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Load-test a comfyui endpoint.")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--autoscaler", help="autoscaler base URL, e.g. http://127.0.0.1:8081")
    target.add_argument("--worker", help="an UNSECURED worker's URL, skipping the autoscaler")
    parser.add_argument("--endpoint", default="comfyui")
    parser.add_argument("--api-key", default="")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--dataset", type=Path, default=DATASET)
    arguments = parser.parse_args(argv)
    if arguments.requests < 1 or arguments.concurrency < 1:
        parser.error("--requests and --concurrency must be at least 1")
    started = time.monotonic()
    totals = asyncio.run(run(arguments))
    report(totals, time.monotonic() - started)
    return 0 if totals.seconds else 1


if __name__ == "__main__":
    sys.exit(main())
