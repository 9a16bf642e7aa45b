"""The `llama` worker's `max_perf` against the capacity it really sustains, on a real llama-server.

`max_perf` is what the autoscaler scales and routes on (issue 19): the worker's own benchmark
must find what the engine completes in steady state through the worker. Here a real
llama-server (the tiny random-weight model at 256x4, one thread) runs with 4 and with 16
slots. A pair is measured: a worker started with nothing cached benchmarks it; once the worker
is READY, bench/capacity.py keeps slots / 2, slots and 2 x slots signed requests in flight
through it, the worker's own benchmark payloads, and counts the tokens the answers' `usage`
reports (the unit of the worker's benchmark) in time windows after a warm-up. The best of
those N, measured once more (the best of three noisy figures leans high, as the worker's own
ramp knows), is the truth the worker's figure must meet, within 10 %. Fewer in flight never
came near on any curve measured here (`python -m bench.truth` sweeps from 1); the time goes to
longer windows at the levels that matter, which scatter less.

The two figures of a pair are a minute apart, and a loaded VM's speed can move by 10 % in a
minute: where a pair disagrees, another is measured (three at most), and the geometric mean
of their ratios decides. The noise of one pair averages out; a worker that measures wrong is
wrong in every pair.

llama-server runs on one core, the worker and this load on another (`cores_apart`), as a GPU
engine's work is out of the worker's way. Ratios seen on a steady 2-core VM: 0.96 to 1.05 with
one pair each (fourteen), beside a CPU hog 4 slots 0.90 then 1.02 (mean 0.96); on a VM whose
speed moved more, 0.88 to 1.10 (bench/README.md).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from bench.capacity import ClosedLoop, Sweep, Target
from bench.processes import cores_apart
from pyworker.protocol.usage import processed_tokens
from pyworker.workers.llama.worker import worker as llama_worker
from pyworker.workers.openai.worker import workload
from tests.conftest import KeyPair
from tests.support.fake_autoscaler import FakeAutoscaler
from tests.support.llama import (
    Process,
    find_or_build_binary,
    spawn_worker,
    start_llama_server,
    wait_until_ready,
)
from tests.support.tiny_gguf import ModelShape, write_model

# The build, when CI must do it here, takes minutes; every wait below has its own deadline.
pytestmark = [pytest.mark.timeout(1800), pytest.mark.exclusive]

SHAPE = ModelShape(n_embd=256, n_layer=4, n_ff=1024, n_ctx=512)
TOLERANCE = 0.10
PAIRS = 3
"""Pairs measured at most: a worker started afresh and the closed loop through it."""
READY_TIMEOUT = 150.0
WARMUP = 2.0
"""Seconds at each N before its windows: enough for the lanes to fall out of step."""
WINDOW = 3.0
WINDOWS = 3
AGAIN_WINDOWS = 5
"""Windows of the best N measured again: its figure is the median of five."""


@pytest.fixture(scope="module")
def llama_binary() -> Path:
    return find_or_build_binary()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("models") / "tiny-256x4.gguf", SHAPE)


@pytest.fixture(params=[4, 16], ids=lambda slots: f"{slots}-slots")
def server(
    request: pytest.FixtureRequest, llama_binary: Path, model: Path, tmp_path: Path
) -> Iterator[tuple[Process, int]]:
    slots: int = request.param
    log = tmp_path / "llama-server.log"
    running = start_llama_server(
        llama_binary, model, log, slots=slots, context_per_slot=SHAPE.n_ctx
    )
    yield running, slots
    running.stop()  # its exit status is not what this test is about


async def test_max_perf_is_the_capacity_sustained_through_the_worker(
    server: tuple[Process, int], tmp_path: Path, keypair: KeyPair
) -> None:
    llama, slots = server
    pairs: list[Pair] = []
    with cores_apart(llama.process.pid):
        for number in range(PAIRS):
            folder = tmp_path / f"pair-{number + 1}"
            folder.mkdir()
            pairs.append(await measure_pair(llama, slots, folder, keypair))
            if abs(mean_ratio(pairs) - 1) <= TOLERANCE:
                break
    report = "\n\n".join(pair.report for pair in pairs)
    measured = f"{len(pairs)} pairs, their mean ratio" if len(pairs) > 1 else "1 pair, its ratio"
    print(f"{slots} slots: {measured} {mean_ratio(pairs):.2f}")
    assert abs(mean_ratio(pairs) - 1) <= TOLERANCE, report


@dataclass(frozen=True, slots=True)
class Pair:
    """One worker's max_perf, and the closed loop's figure through it right after."""

    max_perf: float
    sweep: Sweep
    benchmark: dict[str, object]

    @property
    def ratio(self) -> float:
        return self.max_perf / self.sweep.sustained.produced

    @property
    def report(self) -> str:
        sustained, best = self.sweep.sustained, self.sweep.best
        windows = ", ".join(f"{figure:.0f}" for figure in sustained.windows)
        return (
            f"max_perf {self.max_perf:.0f} tokens/s, sustained {sustained.produced:.0f} at"
            f" {sustained.in_flight} in flight (ratio {self.ratio:.2f}; to the sweep's best"
            f" step, {self.max_perf / best.produced:.2f}; to the requested tokens,"
            f" {self.max_perf / sustained.requested:.2f})\n{self.sweep.table()}\n"
            f"{sustained.in_flight} in flight again: windows {windows}\n"
            f"the worker's benchmark: {self.benchmark}"
        )


def mean_ratio(pairs: list[Pair]) -> float:
    """The geometric mean of the pairs' ratios: 0.9 and 1.1 say the same error."""
    return math.prod(pair.ratio for pair in pairs) ** (1 / len(pairs))


async def measure_pair(llama: Process, slots: int, folder: Path, keypair: KeyPair) -> Pair:
    """A worker with nothing cached benchmarks the engine; its max_perf as the autoscaler
    receives it, then the closed loop through it."""
    async with FakeAutoscaler(keypair.pem) as autoscaler:
        environ = {
            "MODEL_SERVER_URL": llama.url,
            "MODEL_LOG": str(llama.log),
            "REPORT_ADDR": autoscaler.url,
            "CONTAINER_ID": "7",
            "MASTER_TOKEN": "token",
            "UNSECURED": "false",
            "PYWORKER_CACHE_DIR": str(folder / "cache"),
        }
        worker = await asyncio.to_thread(
            spawn_worker, folder / "worker.log", environ, worker="llama"
        )
        try:
            await asyncio.to_thread(wait_until_ready, worker.url, worker.process, READY_TIMEOUT)
            ready = await autoscaler.wait_report(lambda report: report["max_perf"] > 0)
            sweep = await closed_loop(worker.url, keypair, slots)
            benchmark = await worker_benchmark(worker.url)
        finally:
            assert await asyncio.to_thread(worker.stop) == 0, worker.log_text()[-3000:]
    pair = Pair(float(ready["max_perf"]), sweep, benchmark)
    steps = [*sweep.steps, sweep.sustained]
    assert all(step.failures == 0 and step.missing_usage == 0 for step in steps), pair.report
    print(f"{slots} slots: {pair.report.splitlines()[0]}")  # pytest -rP shows it
    return pair


async def worker_benchmark(url: str) -> dict[str, object]:
    """The worker's own curve and why its ramp stopped (/status, as its operator)."""
    headers = {"Authorization": "Bearer token"}
    async with (
        aiohttp.ClientSession(headers=headers) as session,
        session.get(url + "/status") as response,
    ):
        status = await response.json()
    benchmark = status["benchmark"]
    assert isinstance(benchmark, dict)
    return {key: benchmark.get(key) for key in ("curve", "stopped", "ceiling", "seconds")}


async def closed_loop(url: str, keypair: KeyPair, slots: int) -> Sweep:
    """The worker's benchmark payloads, signed as the autoscaler signs them for a client: the
    sweep, and its best N measured again."""
    signed = keypair.auth_data(url=url)
    target = Target(
        url=url + "/v1/completions",
        payloads=list(llama_worker.benchmark.dataset or []),  # as the worker sends them
        envelope=lambda payload: {"auth_data": signed, "payload": payload},
        produced=processed_tokens,
        requested=workload,
        timeout=60.0,
    )
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        loop = ClosedLoop(target, session)
        levels = [slots // 2, slots, 2 * slots]
        return await loop.sweep(levels, WARMUP, WINDOW, WINDOWS, again=AGAIN_WINDOWS)
