"""Benchmark pyworker against the model hit directly and against a bare aiohttp proxy.

    python -m bench.run            # full run, about 4 minutes
    python -m bench.run --quick    # one round, under a minute
    python -m bench.run --smoke    # tiny: checks that everything runs (tests use it)

One machine, loopback only. The proxy under test runs alone on one core; the load generator
(and this process) run on another, and the fake model server shares the generator's core except
when it is the subject itself. Rounds interleave the subjects so that drift in the machine's
speed hits them all alike; the table shows medians over rounds. pyworker runs as `pyworker run`
would in production: signatures verified against a key fetched from a (stand-in) autoscaler,
accounting and reporting on.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from bench import autoscaler
from bench.load import LoadGenerator, choose_generator
from bench.probes import first_chunk_times, slow_batch
from bench.processes import (
    Fleet,
    PeakRss,
    ServerProcess,
    pin,
    raise_open_files_limit,
    usable_cores,
    wait_until_quiet,
)
from bench.report import Figures, Subject, median, render

REPOSITORY = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 60.0
QUIET_PERCENT = 10.0
POLL_INTERVAL = 0.05
PROMPT = (
    "Write one short sentence about the sea at dawn, in plain words, for a reader who has "
    "never seen it."
)
WORKER_TOML = """\
name = "bench"
perf = 1000000.0

[model_server]
base_url = "{model_url}"
health_path = "/health"

[[routes]]
path = "/generate"
workload = "max_tokens"
max_queue_time = 600.0

[[routes]]
path = "/stream"
workload = "max_tokens"
max_queue_time = 600.0

[[routes]]
path = "/slow"
max_queue_time = 600.0
"""


@dataclass(frozen=True, slots=True)
class Plan:
    rounds: int
    throughput_seconds: float
    connections: int
    rate: float
    latency_seconds: float
    stream_samples: int
    slow_count: int
    slow_seconds: float
    warmup_seconds: float
    patience: float
    """How long to wait for other processes to leave the machine idle before a round."""


PLANS = {
    "full": Plan(5, 5.0, 64, 500.0, 5.0, 100, 1000, 2.0, 2.0, 10.0),
    "quick": Plan(1, 3.0, 64, 500.0, 3.0, 30, 1000, 2.0, 1.0, 5.0),
    "smoke": Plan(1, 1.0, 64, 200.0, 1.0, 5, 20, 0.5, 0.0, 0.0),
}


@dataclass(slots=True)
class Placement:
    """Which core each process runs on; None everywhere when there is a single core."""

    load: int | None
    server: int | None
    model: int | None

    def describe(self) -> str:
        if self.server is None:
            return "one usable core: nothing pinned, figures are indicative only"
        return (
            f"load generator and this process on core {self.load}; proxy under test alone on "
            f"core {self.server}; fake model on core {self.model} (on core {self.server} when "
            "it is hit directly)"
        )


def choose_placement(model_core: str) -> Placement:
    cores = usable_cores()
    if len(cores) < 2:
        return Placement(None, None, None)
    load, server = cores[0], cores[1]
    return Placement(load, server, server if model_core == "server" else load)


@dataclass(slots=True)
class Bodies:
    generate: bytes
    stream: bytes
    slow: bytes


def payloads(slow_seconds: float) -> dict[str, dict[str, Any]]:
    generate = {"model": "bench", "prompt": PROMPT, "max_tokens": 64, "temperature": 0.7}
    stream = {**generate, "stream": True, "chunks": 5, "delay": 0.005}
    slow = {**generate, "max_tokens": 1, "seconds": slow_seconds}
    return {"generate": generate, "stream": stream, "slow": slow}


def make_bodies(slow_seconds: float, auth_data: dict[str, Any] | None) -> Bodies:
    """Bare payloads for the model, or the client envelope around them for a proxy."""
    made: dict[str, bytes] = {}
    for name, payload in payloads(slow_seconds).items():
        document = payload if auth_data is None else {"auth_data": auth_data, "payload": payload}
        made[name] = orjson.dumps(document)
    return Bodies(**made)


def auth_data(signer: autoscaler.Signer, url: str) -> dict[str, Any]:
    """What the autoscaler's /route/ hands a client: signed over the worker url only."""
    return {
        "cost": 64,
        "endpoint": "bench",
        "reqnum": 1,
        "request_idx": 1,
        "url": url,
        "signature": signer.sign(url),
    }


@dataclass(slots=True)
class Setup:
    subject: Subject
    process: ServerProcess
    """The process whose CPU and memory are this subject's (the model's, when direct)."""
    url: str
    bodies: Bodies


async def wait_ready(url: str, timeout: float = READY_TIMEOUT) -> None:
    """Poll pyworker's /health until it says ready."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as session:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                async with session.get(url + "/health") as response:
                    document = await response.json(content_type=None)
                    if isinstance(document, dict) and document.get("state") == "ready":
                        return
            await asyncio.sleep(POLL_INTERVAL)
    raise RuntimeError(f"pyworker at {url} was not ready within {timeout:.0f}s")


async def check_signatures(url: str, bodies: Bodies) -> int:
    """Status pyworker answers to a forged signature: 401 proves verification is on."""
    document = orjson.loads(bodies.generate)
    document["auth_data"]["signature"] = "AAAA" + document["auth_data"]["signature"][4:]
    async with (
        aiohttp.ClientSession() as session,
        session.post(url + "/generate", data=orjson.dumps(document)) as response,
    ):
        await response.read()
        return response.status


@contextlib.asynccontextmanager
async def stand_in_autoscaler(
    signer: autoscaler.Signer, reports: autoscaler.Reports
) -> AsyncIterator[str]:
    runner = web.AppRunner(autoscaler.create_app(signer, reports), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def worker_environment(report_addr: str, cache_dir: Path) -> dict[str, str]:
    environ = dict(os.environ)
    for name in ("WORKER_PORT", "USE_SSL", "PUBLIC_IPADDR", "MODEL_LOG", "MODEL_HEALTH_ENDPOINT"):
        environ.pop(name, None)
    python_path = environ.get("PYTHONPATH")
    environ.update(
        REPORT_ADDR=report_addr,
        UNSECURED="false",
        CONTAINER_ID="1",
        MASTER_TOKEN="bench-token",
        WORKER_HTTP_PORT="0",
        PYWORKER_CACHE_DIR=str(cache_dir),
        PYTHONPATH=f"{REPOSITORY}{os.pathsep}{python_path}" if python_path else str(REPOSITORY),
    )
    return environ


async def measure_round(
    setup: Setup, plan: Plan, generator: LoadGenerator, figures: Figures
) -> None:
    process, url, bodies = setup.process, setup.url, setup.bodies
    if plan.patience > 0:
        figures.machine_busy.append(await wait_until_quiet(QUIET_PERCENT, plan.patience))
    cpu_before = process.cpu_seconds()
    with PeakRss(process) as peak:
        result = await generator.closed(
            url + "/generate", bodies.generate, plan.connections, plan.throughput_seconds
        )
    cpu = process.cpu_seconds() - cpu_before
    figures.core_busy.append(cpu / result.seconds if result.seconds > 0 else math.nan)
    figures.requests_per_second.append(result.rate)
    figures.errors.append(result.errors)
    figures.cpu_ms_per_request.append(cpu * 1000.0 / max(result.requests, 1))
    figures.rss_peak.append(peak.peak)

    result = await generator.fixed_rate(
        url + "/generate", bodies.generate, plan.rate, plan.latency_seconds
    )
    figures.p50_ms.append(result.p50_ms)
    figures.p99_ms.append(result.p99_ms)
    figures.fixed_rate.append(result.rate)
    figures.errors[-1] += result.errors

    times = await first_chunk_times(url + "/stream", bodies.stream, plan.stream_samples)
    figures.first_chunk_ms.append(median(times))

    with PeakRss(process) as peak:
        batch = await slow_batch(url + "/slow", bodies.slow, plan.slow_count, plan.slow_seconds)
    figures.slow.append(batch)
    figures.rss_peak_slow.append(peak.peak)


async def benchmark(plan: Plan, options: argparse.Namespace) -> str:
    """Start every process, run the rounds, stop everything; returns the report."""
    placement = choose_placement(options.model_core)
    if placement.load is not None:
        pin(os.getpid(), placement.load)
    raise_open_files_limit()
    signer = autoscaler.Signer()
    reports = autoscaler.Reports()
    with tempfile.TemporaryDirectory(prefix="pyworker-bench-") as temporary:
        workdir = Path(temporary)
        generator = choose_generator(options.generator, workdir, 1)
        async with contextlib.AsyncExitStack() as stack:
            autoscaler_url = await stack.enter_async_context(stand_in_autoscaler(signer, reports))
            fleet = Fleet()
            stack.push_async_callback(fleet.stop)  # before the autoscaler goes: final reports
            setups = await start_subjects(fleet, workdir, placement, autoscaler_url, signer, plan)
            worker = setups[-1]
            forged_status = await check_signatures(worker.url, worker.bodies)
            figures = {setup.subject: Figures() for setup in setups}
            for setup in setups:
                figures[setup.subject].rss_idle = setup.process.rss()
            await run_rounds(setups, figures, plan, generator, setups[0].process, placement)
            report_counts = dict(reports.counts)
    if options.json is not None:
        raw = {str(subject): asdict(figure) for subject, figure in figures.items()}
        options.json.write_bytes(orjson.dumps(raw, option=orjson.OPT_INDENT_2))
    return compose(plan, options, figures, generator, placement, forged_status, report_counts)


async def start_subjects(
    fleet: Fleet,
    workdir: Path,
    placement: Placement,
    autoscaler_url: str,
    signer: autoscaler.Signer,
    plan: Plan,
) -> list[Setup]:
    """The fake model, the bare proxy and pyworker, listening and ready, in table order."""
    model = fleet.add(
        ServerProcess.python(
            "fake model", ["-m", "bench.fake_model"], workdir / "model.log", placement.model
        )
    )
    model_url = await model.wait_listening()
    bare = fleet.add(
        ServerProcess.python(
            "bare proxy",
            ["-m", "bench.bare_proxy", "--model", model_url],
            workdir / "bare.log",
            placement.server,
        )
    )
    config = workdir / "worker.toml"
    config.write_text(WORKER_TOML.format(model_url=model_url))
    worker = fleet.add(
        ServerProcess.python(
            "pyworker",
            ["-m", "pyworker", "run", str(config), "--host", "127.0.0.1", "--port", "0"],
            workdir / "pyworker.log",
            placement.server,
            environ=worker_environment(autoscaler_url, workdir / "cache"),
            cwd=workdir,
        )
    )
    bare_url = await bare.wait_listening()
    worker_url = await worker.wait_listening()
    await wait_ready(worker_url)
    for process in fleet.processes:
        process.move_to(process.core)  # threads started since launch
    signed = auth_data(signer, worker_url)
    return [
        Setup(Subject.DIRECT, model, model_url, make_bodies(plan.slow_seconds, None)),
        Setup(Subject.BARE, bare, bare_url, make_bodies(plan.slow_seconds, signed)),
        Setup(Subject.PYWORKER, worker, worker_url, make_bodies(plan.slow_seconds, signed)),
    ]


async def run_rounds(
    setups: Sequence[Setup],
    figures: dict[Subject, Figures],
    plan: Plan,
    generator: LoadGenerator,
    model: ServerProcess,
    placement: Placement,
) -> None:
    def place_model(setup: Setup) -> None:
        model.move_to(placement.server if setup.subject is Subject.DIRECT else placement.model)

    if plan.warmup_seconds > 0:
        for setup in setups:
            place_model(setup)
            await generator.closed(
                setup.url + "/generate",
                setup.bodies.generate,
                plan.connections,
                plan.warmup_seconds,
            )
    for number in range(1, plan.rounds + 1):
        for setup in setups:
            place_model(setup)
            await measure_round(setup, plan, generator, figures[setup.subject])
        proxies = [setup for setup in setups if setup.subject is not Subject.DIRECT]
        place_model(proxies[0])
        await head_to_head(proxies, plan, generator, figures)
        rates = ", ".join(
            f"{s.subject}: {figures[s.subject].requests_per_second[-1]:,.0f}/s" for s in setups
        )
        print(f"round {number}/{plan.rounds}: {rates}", file=sys.stderr, flush=True)


async def head_to_head(
    proxies: Sequence[Setup], plan: Plan, generator: LoadGenerator, figures: dict[Subject, Figures]
) -> None:
    """Both proxies on their one shared core at once, each with half the connections.

    The scheduler splits the core evenly between two busy processes, and whatever else runs
    on the machine slows both alike, so the ratio of requests served is the ratio of their
    costs per request, steady even on a machine too busy for the separate rounds to count.
    """
    connections = max(plan.connections // len(proxies), 1)
    results = await asyncio.gather(
        *(
            generator.closed(
                setup.url + "/generate",
                setup.bodies.generate,
                connections,
                plan.throughput_seconds,
            )
            for setup in proxies
        )
    )
    for setup, result in zip(proxies, results, strict=True):
        figures[setup.subject].head_to_head.append(result.rate)


def compose(
    plan: Plan,
    options: argparse.Namespace,
    figures: dict[Subject, Figures],
    generator: LoadGenerator,
    placement: Placement,
    forged_status: int,
    report_counts: dict[str, int],
) -> str:
    command = "python -m bench.run" + "".join(f" {shlex.quote(a)}" for a in options.argv)
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    notes = [
        f"Command: `{command}`",
        "",
        render(figures, plan.rounds, plan.slow_count, plan.slow_seconds, plan.rate),
        "",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores; Python {platform.python_version()}, "
        f"aiohttp {aiohttp.__version__}",
        f"- placement: {placement.describe()}; load average at the end: {load}",
        f"- load generator: {generator.name}"
        + (
            ""
            if generator.name == "wrk"
            else " (not wrk: a Python client on one core cannot saturate the proxies, so "
            "requests/s here are the generator's ceiling, not the proxies'; install wrk)"
        ),
        f"- latency: {plan.latency_seconds:g} s at ~{plan.rate:g} req/s "
        f"(achieved {median(figures[Subject.PYWORKER].fixed_rate):,.0f}/s through pyworker); "
        f"added = subject minus model direct in the same round",
        f"- other processes' CPU use before each round: {busy_summary(figures)}",
        f"- pyworker answered a forged signature with {forged_status}; "
        f"status reports received by the stand-in autoscaler: {report_counts or 'none'}",
    ]
    return "\n".join(notes)


def busy_summary(figures: dict[Subject, Figures]) -> str:
    seen = [busy for figure in figures.values() for busy in figure.machine_busy]
    if not seen:
        return "not checked"
    noisy = sum(busy > QUIET_PERCENT for busy in seen)
    return (
        f"median {median(seen):.0f}%, worst {max(seen):.0f}%; "
        f"{noisy} of {len(seen)} rounds started above {QUIET_PERCENT:.0f}%"
    )


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="one short round (under a minute)")
    size.add_argument("--smoke", action="store_true", help="a tiny run that checks it works")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default: 5, quick: 1)")
    parser.add_argument("--generator", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument(
        "--model-core",
        choices=("load", "server"),
        default="load",
        help="share the fake model's core with the load generator (default) or the proxy",
    )
    parser.add_argument(
        "--patience",
        type=float,
        help="seconds to wait before each round for other processes to leave the CPU idle",
    )
    parser.add_argument("--json", type=Path, help="also write the raw figures to this file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    options = build_parser().parse_args(arguments)
    options.argv = arguments
    plan = PLANS["smoke" if options.smoke else "quick" if options.quick else "full"]
    if options.rounds is not None:
        if options.rounds < 1:
            print("--rounds must be at least 1", file=sys.stderr)
            return 2
        plan = replace(plan, rounds=options.rounds)
    if options.patience is not None:
        plan = replace(plan, patience=max(options.patience, 0.0))
    started = time.monotonic()
    with contextlib.suppress(ImportError):
        import uvloop  # the probes measure the servers, not this process: make it cheap

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    table = asyncio.run(benchmark(plan, options))
    print(table)
    print(f"\n(run took {time.monotonic() - started:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
