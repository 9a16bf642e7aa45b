"""The closed-loop ramp against a fake batching engine whose capacity is known.

The engine (tests/support/batching_engine.py) runs in its own process, so that its step clock
does not share the benchmark's CPU; its service times (tens of milliseconds a request and
more) are long next to a loaded machine's scheduling jitter.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pyworker.config import BenchmarkConfig, LimitProbe, RouteConfig, WorkerConfig
from pyworker.config.dataset import BenchmarkError
from pyworker.config.environment import Environment
from pyworker.lifecycle.benchmark import Benchmark, BenchmarkResult
from pyworker.lifecycle.declared import probe_declared
from pyworker.lifecycle.gpu import GpuMonitor
from pyworker.protocol.usage import completion_tokens
from pyworker.serving.compose import compose_worker
from pyworker.upstream.model import ModelClient
from tests.fakes.nvml import FakeNvml
from tests.support.batching_engine import BatchingEngine
from tests.support.processes import spawn, stop

pytestmark = pytest.mark.exclusive

TOKENS = (6, 12, 8, 14, 7, 10, 13, 10)
"""Answer lengths, in turn: they vary, and average 10 tokens."""
DATASET = [{"max_tokens": n} for n in TOKENS]
SILENT = [{"max_tokens": n, "usage": False} for n in TOKENS]
"""Answers without `usage`: they do not say how many tokens they generated."""


@dataclass
class Engine:
    url: str
    model: BatchingEngine
    """The same model, not served: what the capacity is."""

    async def stats(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as session, session.get(self.url + "/stats") as got:
            stats: dict[str, Any] = await got.json()
            return stats


async def start_engine(slots: int, step: float) -> tuple[Engine, asyncio.subprocess.Process]:
    arguments = ("--slots", str(slots), "--step", str(step))
    process, url = await spawn("-m", "tests.support.batching_engine", *arguments, env=_env())
    return Engine(url, BatchingEngine(slots, step)), process


def _env() -> dict[str, str]:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return {**os.environ, "PYTHONPATH": root}


@pytest.fixture
async def engines() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    started: list[asyncio.subprocess.Process] = []
    yield started
    for process in started:
        await stop(process)


async def _engine(engines: list[asyncio.subprocess.Process], slots: int, step: float) -> Engine:
    engine, process = await start_engine(slots, step)
    engines.append(process)
    return engine


def _route(**fields: Any) -> RouteConfig:
    return RouteConfig.model_validate(
        {
            "path": "/v1/completions",
            "workload": "max_tokens",
            "produced_work": completion_tokens,
            **fields,
        }
    )


async def _bench(url: str, route: RouteConfig | None = None, **config: Any) -> BenchmarkResult:
    model = ModelClient(url, connect_timeout=30)
    try:
        settings = BenchmarkConfig.model_validate({"dataset": DATASET, **config})
        payloads = settings.dataset or DATASET
        route = route or _route()
        declared = await probe_declared(model, route, settings)  # as the worker does
        return await Benchmark(model, route, settings, declared).run(payloads)
    finally:
        await model.close()


@pytest.mark.parametrize(("slots", "step"), [(4, 0.005), (64, 0.004)])
async def test_lands_on_the_capacity_where_throughput_stops_growing(
    engines: list[asyncio.subprocess.Process], slots: int, step: float
) -> None:
    engine = await _engine(engines, slots, step)
    result = await _bench(engine.url, max_seconds=30)
    curve = [step.to_dict() for step in result.curve]
    assert result.perf == pytest.approx(engine.model.capacity, rel=0.05), curve
    # The figure is the chosen N measured again, unless the budget left no time for it.
    confirmed = result.confirmed
    assert confirmed is not None or result.stopped == "time budget spent", curve
    if confirmed is not None:
        assert confirmed.concurrency == result.concurrency and result.perf == confirmed.perf
    # Past the plateau it takes two flat steps to stop; a loaded machine's longer windows may
    # spend the budget first, with the same figure: the budget ends it, the log says so.
    assert "stopped growing" in result.stopped or result.stopped == "time budget spent", curve
    assert result.ceiling == "256 (default)"
    assert result.concurrency >= slots  # fewer in flight leave slots idle
    # The budget bounds the ramp; the first answer and the last requests' end come on top.
    assert result.seconds < 30 + 5 and result.counted == "produced work (from every answer)"
    levels = [step.concurrency for step in result.curve]
    assert levels == [2**index for index in range(len(levels))]
    # A budget that ends during the next step's warm-up leaves that step off the curve.
    peak = (await engine.stats())["peak_in_flight"]
    assert peak == levels[-1] or (result.stopped == "time budget spent" and peak == 2 * levels[-1])


@pytest.mark.slow
async def test_lands_on_the_capacity_of_256_slots_declared_by_the_engine(
    engines: list[asyncio.subprocess.Process],
) -> None:
    engine = await _engine(engines, 256, 0.01)
    probe = LimitProbe(path="/props", field="total_slots")
    result = await _bench(engine.url, limit_probe=probe, max_seconds=60)
    # Up to twice the slots: the engine's queue keeps all 256 busy (at 256 in flight each
    # request's round trip idles its slot for a step, 2 % under the capacity).
    assert result.perf == pytest.approx(engine.model.capacity, rel=0.05)
    assert result.ceiling == "512 (twice the 256 declared by the engine at /props)"
    assert result.concurrency in (256, 512) and result.seconds < 60


async def test_never_goes_over_the_configured_ceiling(
    engines: list[asyncio.subprocess.Process],
) -> None:
    engine = await _engine(engines, 64, 0.01)
    probe = LimitProbe(path="/props", field="total_slots")  # 64: the smaller, 6, wins
    result = await _bench(engine.url, max_concurrency=6, limit_probe=probe)
    assert [step.concurrency for step in result.curve] == [1, 2, 4, 6]
    assert result.ceiling == "6 (configured; the engine declares 64)"
    assert result.stopped == "reached the ceiling of 6 in flight"
    # Below the engine's slots each request's round trip (slower on a loaded machine) leaves
    # its slot idle: the model's figure is an upper bound there.
    mean = sum(TOKENS) / len(TOKENS)
    assert 0.7 < result.perf / engine.model.closed_loop(6, mean) < 1.05
    assert (await engine.stats())["peak_in_flight"] == 6


async def test_keeps_the_highest_concurrency_within_the_latency_limit(
    engines: list[asyncio.subprocess.Process],
) -> None:
    engine = await _engine(engines, 4, 0.004)
    # A request of 14 tokens takes 14 steps: 0.112 s with 1 in flight, 0.28 s with 4 (every
    # slot busy), twice that with 8 (half of them queued). 0.4 s lies between 4 and 8.
    result = await _bench(engine.url, latency_limit=0.4)
    *within, over = result.curve
    assert all(step.p90 <= 0.4 for step in within) and over.p90 > 0.4
    assert result.concurrency == within[-1].concurrency < over.concurrency <= 8
    assert f"over the limit 0.4 s at {over.concurrency} in flight" in result.stopped
    assert result.confirmed is not None and result.confirmed.concurrency == result.concurrency
    assert result.perf == result.confirmed.perf  # the chosen N measured again


async def test_keeps_the_highest_concurrency_within_the_token_latency_limit(
    engines: list[asyncio.subprocess.Process], caplog: pytest.LogCaptureFixture
) -> None:
    engine = await _engine(engines, 4, 0.004)
    # Each token takes one step: 0.008 s with 1 in flight, 0.02 s with 4 (every slot busy),
    # about twice that with 8 (half of them queued). 0.03 s a token lies between 4 and 8.
    result = await _bench(engine.url, token_latency_limit=0.03)
    *within, over = result.curve
    assert all(s.p90_per_token is not None and s.p90_per_token <= 0.03 for s in within)
    assert over.p90_per_token is not None and over.p90_per_token > 0.03
    assert result.concurrency == within[-1].concurrency < over.concurrency <= 8
    assert f"over the limit 0.03 s at {over.concurrency} in flight" in result.stopped
    assert "p90 time per output token" in result.stopped

    # Answers that do not say their tokens leave the limit unchecked, and the log says so.
    caplog.set_level(logging.WARNING, "pyworker.lifecycle")
    silent = _route(produced_work=None)
    await _bench(engine.url, silent, max_concurrency=2, token_latency_limit=0.03, dataset=SILENT)
    assert "token_latency_limit not applied" in caplog.text


async def test_a_fifo_route_stays_at_one_in_flight(
    engines: list[asyncio.subprocess.Process],
) -> None:
    engine = await _engine(engines, 4, 0.005)  # 0.1 s a request: its round trip is small
    result = await _bench(engine.url, _route(fifo=True), max_concurrency=64)
    assert [step.concurrency for step in result.curve] == [1]
    assert result.ceiling == "1 (fifo route)"
    assert result.confirmed is None  # one step is no choice: nothing to measure again
    assert 0.7 < result.perf / engine.model.throughput(1) < 1.05  # round trips: see above
    assert (await engine.stats())["peak_in_flight"] == 1


async def test_ends_at_its_time_budget_with_the_best_figure_so_far(
    engines: list[asyncio.subprocess.Process], caplog: pytest.LogCaptureFixture
) -> None:
    engine = await _engine(engines, 256, 0.01)
    caplog.set_level(logging.INFO, "pyworker.lifecycle")
    result = await _bench(engine.url, max_seconds=1.5)
    # Each step needs about six request latencies: 1.5 s is a few steps of the eight.
    assert result.stopped == "time budget spent"
    assert 1 <= len(result.curve) < 8
    # No time is left to measure the best step again: its own figure stands.
    assert result.confirmed is None
    assert result.perf == max(step.perf for step in result.curve) > 0
    # The budget starts after the first answer, and a step waits out its requests.
    assert result.seconds < 1.5 + 2.0
    assert "time budget (benchmark.max_seconds) ran out" in caplog.text


async def test_a_benchmark_of_no_work_is_an_error_naming_the_cause(
    engines: list[asyncio.subprocess.Process],
) -> None:
    engine = await _engine(engines, 4, 0.001)  # figures are not checked here: a fast engine
    nothing = [{"max_tokens": 0}]
    with pytest.raises(BenchmarkError, match="weigh 0 workload units"):
        await _bench(engine.url, _route(produced_work=None), dataset=nothing, max_concurrency=2)

    def says_nothing(answer: dict[str, Any]) -> float:
        return 0.0

    with pytest.raises(BenchmarkError, match="report no produced work"):
        await _bench(engine.url, _route(produced_work=says_nothing), max_concurrency=2)

    # Answers that say nothing of their work are counted at the workload asked.
    silent = _route(produced_work=lambda answer: None)
    result = await _bench(engine.url, silent, max_concurrency=2)
    assert result.counted == "requested workload (no answer said what it produced)"
    assert result.perf > 0


async def test_a_cached_figure_holds_while_the_engine_declares_the_same(
    engines: list[asyncio.subprocess.Process], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An engine restarted with more slots (llama-server's --parallel) is measured again."""
    four = await _engine(engines, 4, 0.002)
    eight = await _engine(engines, 8, 0.002)
    caplog.set_level(logging.INFO, "pyworker.lifecycle")
    measured = await _start(four.url, tmp_path)
    assert not measured.cached and measured.declared == 4
    again = await _start(four.url, tmp_path)
    assert again.cached and again.perf == measured.perf
    assert "measured again" not in caplog.text
    more = await _start(eight.url, tmp_path)
    assert not more.cached and more.declared == 8
    assert "measured when the engine declared 4 at once, now 8: measured again" in caplog.text
    assert (await _start(eight.url, tmp_path)).cached


async def _start(url: str, tmp_path: Path) -> BenchmarkResult:
    """A worker's benchmark at start, with its cache in `tmp_path`, as `pyworker run` runs it."""
    raw: dict[str, Any] = {
        "name": "ramp-cache",
        "model_server": {"base_url": url},
        "routes": [{"path": "/v1/completions", "workload": "max_tokens"}],
        "benchmark": {
            "dataset": DATASET,
            "max_seconds": 2,
            "limit_probe": {"path": "/props", "field": "total_slots"},
            "cache_file": str(tmp_path / "benchmark.json"),
        },
    }
    config = WorkerConfig.model_validate(raw)
    worker = compose_worker(config, Environment.from_env({}), GpuMonitor(FakeNvml([])))
    try:
        return await worker.readiness.benchmarks.measure()
    finally:
        await worker.model.close()
