"""`pyworker bench WORKER`: only the benchmark, against a model server already running.

It loads the worker's config as `pyworker run` does (a workers/ name, a .toml or .py file, a
module; `--set` overrides), runs the ramp against `model_server.base_url` and prints the
capacity curve: requests in flight, throughput in the route's workload units, p50 and p90
latency. No worker is started, no cache is read or written, nothing is reported: a template
author sizes an endpoint before deploying it. Exit 0 with a figure, 1 when the benchmark
failed (the reason on stderr), 2 for a config error.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any, TextIO

from pyworker.config import WorkerConfig
from pyworker.config.dataset import BenchmarkError, load_dataset
from pyworker.config.environment import Environment, InvalidEnvironment
from pyworker.config.loader import ConfigError, load_config
from pyworker.devtools.commands.arguments import add_command
from pyworker.lifecycle.benchmark import Benchmark, BenchmarkResult
from pyworker.lifecycle.declared import limit_connections, probe_declared
from pyworker.upstream.model import ModelClient


def add_parser(commands: Any) -> None:
    summary = "benchmark a running model server and print its capacity curve"
    parser = add_command(commands, "bench", summary, __doc__)
    parser.add_argument("target", help="a workers/ folder name, a .toml or .py config, or a module")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set benchmark.max_concurrency=64",
    )
    parser.add_argument("--url", help="the model server's base URL (default: the config's)")
    parser.set_defaults(handler=command_bench, log_level="INFO")  # the steps, on stderr


def command_bench(arguments: argparse.Namespace) -> int:
    overrides = list(arguments.overrides)
    if arguments.url:
        overrides.append(f"model_server.base_url={arguments.url}")
    try:
        environment = Environment.from_env(dict(os.environ))
        config = load_config(arguments.target, overrides, environment)
    except (ConfigError, InvalidEnvironment) as error:
        print(f"pyworker bench: {error}", file=sys.stderr)
        return 2
    try:
        result = asyncio.run(bench(config))
    except BenchmarkError as error:
        print(f"pyworker bench: benchmark failed: {error}", file=sys.stderr)
        return 1
    print_curve(config, result, sys.stdout)
    return 0


async def bench(config: WorkerConfig) -> BenchmarkResult:
    settings = config.benchmark
    route = next((r for r in config.routes if r.path == settings.route), config.routes[0])
    server = config.model_server
    model = ModelClient(
        server.base_url, server.connect_timeout, max_connections=server.max_connections
    )
    try:
        payloads = await asyncio.to_thread(load_dataset, settings)
        declared = await probe_declared(model, route, settings)
        limit_connections(model, settings, declared)  # as the worker holds them
        return await Benchmark(model, route, settings, declared).run(payloads)
    finally:
        await model.close()


def print_curve(config: WorkerConfig, result: BenchmarkResult, out: TextIO) -> None:
    route = config.benchmark.route or config.routes[0].path
    out.write(f"{config.name} {route} at {config.model_server.base_url}\n")
    out.write(f"{'in flight':>9}  {'units/s':>12}  {'p50 s':>8}  {'p90 s':>8}  {'requests':>8}\n")
    for step in result.curve:
        mark = "  <- chosen" if step.concurrency == result.concurrency else ""
        failed = f" ({step.failed} failed)" if step.failed else ""
        out.write(
            f"{step.concurrency:>9}  {step.perf:>12.2f}  {step.p50:>8.3f}  {step.p90:>8.3f}"
            f"  {step.requests:>8}{failed}{mark}\n"
        )
    confirmed = result.confirmed
    if confirmed is not None:
        out.write(
            f"measured again at {confirmed.concurrency} in flight: {confirmed.perf:.2f}/s"
            f" over {len(confirmed.windows)} windows\n"
        )
    out.write(f"max_perf {result.perf:.2f}/s at {result.concurrency} in flight\n")
    out.write(f"stopped: {result.stopped}\n")
    out.write(f"ceiling: {result.ceiling}; counted: {result.counted}\n")
    out.write(f"took {result.seconds:.1f} s\n")
