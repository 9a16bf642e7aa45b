"""`pyworker load -n N --rps R [--concurrency C]`: a load test through the autoscaler.

Requests start at a steady rate R (open loop), each routed like a real client's, with at most
C in flight: when C are in flight the next waits for a slot, so a saturated worker shows as an
achieved rate below R. The summary gives throughput, latency percentiles of the successful
requests, the count of each status (with the reason for those that got no HTTP answer:
routing, timeout, connection), and the workload served per second (the completion tokens the
answers report in `usage`, else the cost announced to the autoscaler).

The load scripts of the ready workers (`workers/<name>/load.py`) are this same loop with the
worker's route, payload preparation and work counting: see `add_worker_arguments` and
`run_worker_load`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from pyworker.config import BenchmarkConfig
from pyworker.config.dataset import BenchmarkError, load_dataset
from pyworker.devtools.commands.arguments import add_command, add_target_arguments, resolve_target
from pyworker.devtools.commands.dev.state import DevState
from pyworker.devtools.commands.progress import ProgressBar
from pyworker.devtools.commands.routing import (
    DataError,
    RoutingError,
    Target,
    add_worker_target_arguments,
    current_state,
    default_cost,
    parse_data,
    route_request,
    unsigned_auth_data,
    worker_body,
    worker_url,
)
from pyworker.lifecycle.benchmark import produced_documents
from pyworker.protocol.usage import completion_tokens

DEFAULT_ROUTE = "/v1/completions"
DEFAULT_CONCURRENCY = 32
MAX_REQUESTS = 1_000_000
MAX_CONCURRENCY = 10_000
PROGRESS_INTERVAL = 0.1


def add_parser(commands: Any) -> None:
    parser = add_command(commands, "load", "load-test the endpoint through the autoscaler", __doc__)
    parser.add_argument(
        "route",
        nargs="?",
        help=f"the worker route (default: the running `pyworker dev`'s, else {DEFAULT_ROUTE})",
    )
    parser.add_argument("-n", "--requests", type=int, default=100, help="requests to send")
    parser.add_argument("--rps", type=float, default=10.0, help="requests started per second")
    parser.add_argument(
        "--concurrency",
        "-c",
        type=int,
        default=DEFAULT_CONCURRENCY,
        help=f"requests in flight at most (default {DEFAULT_CONCURRENCY})",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", "-d", help="one payload for every request: JSON or @FILE")
    source.add_argument(
        "--dataset",
        metavar="FILE",
        help="payloads to cycle through: a JSON list or JSONL file (default: the running "
        "`pyworker dev`'s benchmark dataset)",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_target_arguments(parser)
    parser.set_defaults(handler=command_load, log_level="WARNING")


def produced_work(body: bytes, content_type: str, cost: float) -> float:
    """The completion tokens the answer reports (its last `usage`), else the announced cost."""
    produced: float | None = None
    for document in produced_documents(body, content_type):
        tokens = completion_tokens(document)
        if tokens is not None:
            produced = tokens
    return cost if produced is None else produced


WorkCounter = Callable[[bytes, str, float], float]
"""The work one answer did, from its body, its content type and the cost announced for it."""


@dataclass(frozen=True, slots=True)
class LoadPlan:
    target: Target
    route: str
    payloads: list[Any]
    requests: int
    rps: float
    """Requests started per second; `math.inf` sends back to back, `concurrency` at a time."""
    concurrency: int
    cost: float | None
    wait: float
    timeout: float
    worker: str | None = None
    """An UNSECURED worker's URL: send to it unsigned, without asking the autoscaler."""
    prepare: Callable[[Any], Any] | None = None
    """Applied to each payload before it is sent (a fresh seed, streaming flags)."""
    cost_of: Callable[[Any], float] = default_cost
    work: WorkCounter = produced_work


@dataclass(frozen=True, slots=True)
class Outcome:
    status: str
    """The worker's HTTP status, or why there was none: routing, timeout, connection."""
    seconds: float
    work: float
    first_byte: float | None = None
    """Seconds from sending to the first byte of the answer's body (a stream's first token)."""
    reason: str = ""
    """Why there was no HTTP status (routing, timeout, connection), in words."""

    @property
    def ok(self) -> bool:
        return self.status.isdigit() and 200 <= int(self.status) < 300


@dataclass(slots=True)
class LoadReport:
    target_rps: float
    elapsed: float = 0.0
    outcomes: list[Outcome] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        ok = [outcome for outcome in self.outcomes if outcome.ok]
        latencies = sorted(outcome.seconds for outcome in ok)
        first_bytes = sorted(o.first_byte for o in ok if o.first_byte is not None)
        elapsed = max(self.elapsed, 1e-9)
        work = sum(outcome.work for outcome in ok)
        return {
            "requests": len(self.outcomes),
            "ok": len(ok),
            "failed": len(self.outcomes) - len(ok),
            "seconds": round(self.elapsed, 3),
            "target_rps": self.target_rps,
            "throughput": len(self.outcomes) / elapsed,
            "ok_per_second": len(ok) / elapsed,
            "latency": {
                "p50": percentile(latencies, 50),
                "p90": percentile(latencies, 90),
                "p99": percentile(latencies, 99),
                "max": latencies[-1] if latencies else None,
                "mean": sum(latencies) / len(latencies) if latencies else None,
            },
            "first_byte": {
                "p50": percentile(first_bytes, 50),
                "p90": percentile(first_bytes, 90),
            },
            "status_counts": dict(sorted(Counter(o.status for o in self.outcomes).items())),
            "reasons": self.reasons(),
            "workload": work,
            "workload_per_second": work / elapsed,
        }

    def reasons(self) -> dict[str, str]:
        """For each status without an HTTP answer, the first reason seen (one per status)."""
        found: dict[str, str] = {}
        for outcome in self.outcomes:
            if outcome.reason and outcome.status not in found:
                found[outcome.status] = outcome.reason
        return dict(sorted(found.items()))


def percentile(ordered: Sequence[float], rank: float) -> float | None:
    """The `rank`th percentile of sorted values, interpolating between neighbours."""
    if not ordered:
        return None
    position = (len(ordered) - 1) * rank / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def format_summary(summary: dict[str, Any]) -> str:
    latency = summary["latency"]
    lines = [
        f"requests:   {summary['requests']} sent, {summary['ok']} ok, {summary['failed']} failed"
        f" in {summary['seconds']:.2f} s",
        f"throughput: {summary['throughput']:.2f} requests/s"
        f" (target {summary['target_rps']:g}/s), {summary['ok_per_second']:.2f} ok/s",
    ]
    if latency["p50"] is None:
        lines.append("latency:    no successful request")
    else:
        lines.append(
            "latency:    "
            + "  ".join(f"{key} {latency[key]:.3f} s" for key in ("p50", "p90", "p99", "max"))
        )
    first_byte = summary["first_byte"]
    if first_byte["p50"] is not None:
        lines.append(f"first byte: p50 {first_byte['p50']:.3f} s  p90 {first_byte['p90']:.3f} s")
    counts = ", ".join(f"{status} x{count}" for status, count in summary["status_counts"].items())
    lines.append(f"status:     {counts or '-'}")
    for status, reason in summary["reasons"].items():
        lines.append(f"why {status}: {reason}")
    lines.append(
        f"workload:   {summary['workload']:.1f} served,"
        f" {summary['workload_per_second']:.2f} per second"
    )
    return "\n".join(lines)


def command_load(arguments: argparse.Namespace) -> int:
    if (error := _size_error(arguments, max_rps=math.inf)) is not None:
        return _usage(error)
    state = current_state(arguments.autoscaler is not None)
    target = resolve_target(arguments, state, "load")
    if target is None:
        return 1
    try:
        payloads = choose_payloads(arguments.data, arguments.dataset, state)
    except (DataError, BenchmarkError) as error:
        return _usage(str(error))
    plan = LoadPlan(
        target=target,
        route=arguments.route or (state.route if state and state.route else DEFAULT_ROUTE),
        payloads=payloads,
        requests=arguments.requests,
        rps=arguments.rps,
        concurrency=arguments.concurrency,
        cost=arguments.cost,
        wait=max(arguments.wait, 0.0),
        timeout=arguments.timeout,
    )
    return _run_and_print(plan, ProgressBar(plan.requests), arguments.json)


def _run_and_print(plan: LoadPlan, progress: ProgressBar | None, as_json: bool) -> int:
    """Run the plan and print its summary; 0 if every request succeeded, else 1."""
    try:
        report = asyncio.run(run_load(plan, progress))
    except KeyboardInterrupt:
        return 130
    summary = report.summary()
    if as_json:
        print(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    else:
        print(format_summary(summary))
    return 0 if summary["failed"] == 0 else 1


def _size_error(arguments: argparse.Namespace, max_rps: float | None) -> str | None:
    """What is wrong with -n, --rps and --concurrency, if anything; `--rps` below `max_rps`."""
    if not 0 < arguments.requests <= MAX_REQUESTS:
        return f"-n/--requests must be between 1 and {MAX_REQUESTS}"
    if not (arguments.rps > 0 and (max_rps is None or arguments.rps < max_rps)):
        return "--rps must be a positive number"
    if not 0 < arguments.concurrency <= MAX_CONCURRENCY:
        return f"--concurrency must be between 1 and {MAX_CONCURRENCY}"
    return None


def _usage(message: str) -> int:
    print(f"pyworker load: {message}", file=sys.stderr)
    return 2


def choose_payloads(data: str | None, dataset: str | None, state: DevState | None) -> list[Any]:
    """`--data`, else `--dataset`, else the dev session's dataset or example."""
    if data is not None:
        return [parse_data(data)]
    dataset = dataset or (state.dataset_file if state else None)
    if dataset:
        if not Path(dataset).is_file():
            raise DataError(f"dataset {dataset} is not a file")
        return load_dataset(BenchmarkConfig(dataset_file=dataset))
    if state is not None and state.example is not None:
        return [state.example]
    raise DataError("what to send? pass --data or --dataset (or run `pyworker dev` first)")


async def run_load(plan: LoadPlan, progress: ProgressBar | None = None) -> LoadReport:
    report = LoadReport(target_rps=plan.rps)
    slots = asyncio.Semaphore(plan.concurrency)
    payloads = itertools.cycle(plan.payloads)
    connector = aiohttp.TCPConnector(limit=plan.concurrency)
    in_flight: set[asyncio.Task[None]] = set()
    display = asyncio.create_task(_show(report, plan.requests, progress))

    async def one(payload: Any, session: aiohttp.ClientSession) -> None:
        try:
            report.outcomes.append(await send_one(session, plan, payload))
        finally:
            slots.release()

    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.monotonic()
        try:
            for index in range(plan.requests):
                delay = started + index / plan.rps - time.monotonic()  # index / inf is 0
                if delay > 0:
                    await asyncio.sleep(delay)
                await slots.acquire()
                task = asyncio.create_task(one(next(payloads), session))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            while in_flight:
                await asyncio.wait(set(in_flight))
        finally:
            for task in in_flight:
                task.cancel()
            report.elapsed = time.monotonic() - started
            display.cancel()
    if progress is not None:
        await asyncio.to_thread(progress.finish, len(report.outcomes), _detail(report))
    return report


async def send_one(session: aiohttp.ClientSession, plan: LoadPlan, payload: Any) -> Outcome:
    if plan.prepare is not None:
        payload = plan.prepare(payload)
    cost = plan.cost if plan.cost is not None else plan.cost_of(payload)
    started = time.monotonic()
    first_byte: float | None = None
    try:
        if plan.worker is not None:
            auth_data = unsigned_auth_data(plan.worker) | {"cost": cost}
        else:
            auth_data = await route_request(session, plan.target, cost, plan.wait)
        sent = time.monotonic()
        async with session.post(
            worker_url(auth_data, plan.route),
            data=worker_body(auth_data, payload),
            headers={"Content-Type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=plan.timeout),
        ) as response:
            parts = []
            async for chunk in response.content.iter_any():
                if first_byte is None:
                    first_byte = time.monotonic() - sent
                parts.append(chunk)
            body = b"".join(parts)
            status, content_type = response.status, response.content_type
    except RoutingError as error:
        return Outcome("routing", time.monotonic() - started, 0.0, reason=str(error))
    except asyncio.TimeoutError:
        reason = f"no complete answer within --timeout {plan.timeout:g} s"
        return Outcome("timeout", time.monotonic() - started, 0.0, reason=reason)
    except aiohttp.ClientError as error:
        reason = f"the worker failed: {error.__class__.__name__} {error}".strip()
        return Outcome("connection", time.monotonic() - started, 0.0, reason=reason)
    seconds = time.monotonic() - started
    return Outcome(str(status), seconds, plan.work(body, content_type, cost), first_byte)


def _detail(report: LoadReport) -> str:
    done = len(report.outcomes)
    failed = sum(1 for outcome in report.outcomes if not outcome.ok)
    return f"{failed} failed" if failed else ("all ok" if done else "")


async def _show(report: LoadReport, total: int, progress: ProgressBar | None) -> None:
    if progress is None:
        return
    shown = -1
    while True:
        done = len(report.outcomes)
        if done != shown:
            shown = done
            await asyncio.to_thread(progress.update, done, _detail(report))
        await asyncio.sleep(PROGRESS_INTERVAL)


# --- for the ready workers' load scripts (workers/<name>/load.py) ---------------------------
def add_worker_arguments(
    parser: argparse.ArgumentParser,
    endpoint: str,
    dataset: Path,
    requests: int = 100,
    concurrency: int = 8,
) -> None:
    """The flags every worker's load script takes; the script adds its own after these."""
    add_worker_target_arguments(parser, endpoint)
    parser.add_argument("-n", "--requests", type=int, default=requests)
    parser.add_argument(
        "-c", "--concurrency", type=int, default=concurrency, help="requests in flight at most"
    )
    parser.add_argument(
        "--rps", type=float, default=math.inf, help="requests started per second (default: "
        "back to back, as fast as --concurrency allows)"
    )  # fmt: skip
    parser.add_argument("--dataset", type=Path, default=dataset, help="JSON or JSONL payloads")
    parser.add_argument("--timeout", type=float, default=600.0, help="limit on each request")
    parser.add_argument("--wait", type=float, default=300.0, help="wait for a ready worker")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run_worker_load(
    arguments: argparse.Namespace,
    route: str,
    *,
    prepare: Callable[[Any], Any] | None = None,
    cost_of: Callable[[Any], float] = default_cost,
    work: WorkCounter = produced_work,
) -> int:
    """Run a worker's load test from `add_worker_arguments` flags; the exit status."""
    if (error := _size_error(arguments, max_rps=None)) is not None:
        return _usage(error)
    try:
        payloads = load_dataset(BenchmarkConfig(dataset_file=str(arguments.dataset)))
    except BenchmarkError as error:
        return _usage(str(error))
    plan = LoadPlan(
        target=Target(
            (arguments.autoscaler or "").rstrip("/"), arguments.endpoint, arguments.api_key
        ),
        route=route,
        payloads=payloads,
        requests=arguments.requests,
        rps=arguments.rps,
        concurrency=arguments.concurrency,
        cost=None,
        wait=max(arguments.wait, 0.0),
        timeout=arguments.timeout,
        worker=arguments.worker.rstrip("/") if arguments.worker else None,
        prepare=prepare,
        cost_of=cost_of,
        work=work,
    )
    return _run_and_print(plan, None, arguments.json)
