"""The worker's `max_perf` against the truth: a closed-loop measurement through the worker.

    python -m bench.truth                       # 4, 8 and 16 slots, about 4 minutes
    python -m bench.truth --slots 4,16 --window 2 --windows 2

For each slot count: a real llama.cpp `llama-server` (`scripts/build-llama-server`) with a
random-weight llama from `tests/support/tiny_gguf.py` (`--n-embd 256 --n-layer 4 --n-ff 1024`),
one generation thread and `--parallel SLOTS`; then `pyworker run llama` in front of it, with
signatures checked against a stand-in autoscaler. Once the worker is READY, its `max_perf` is
read from /status (and from its last report), and bench/capacity.py drives the worker's own
benchmark payloads, signed as a client sends them, at 1, 2, 4, ... 2 x SLOTS in flight, then
measures the best of those N once more (`--confirm-windows`): the best step was picked as the
highest of several noisy figures, so its own figure leans high (the worker's ramp measures its
choice again for the same reason). The table puts the worker's figure beside both, and the
ratio to the second. `--pin` puts llama-server on one core and the worker and this load on
another, as a GPU engine's work is out of the worker's way. Every process it starts is
stopped on exit, whatever the exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp

from bench import autoscaler
from bench.capacity import ClosedLoop, Step, Sweep, Target, concurrency_levels
from bench.processes import Fleet, ServerProcess, cores_apart
from bench.run import auth_data, stand_in_autoscaler, worker_environment
from pyworker.protocol.usage import processed_tokens
from pyworker.workers.llama.worker import worker as llama_worker
from pyworker.workers.openai.worker import workload

REPOSITORY = Path(__file__).resolve().parent.parent
MODEL_SHAPE = ("--n-embd", "256", "--n-layer", "4", "--n-ff", "1024", "--n-ctx", "512")
CONTEXT_PER_SLOT = 512
ROUTE = "/v1/completions"
POLL_INTERVAL = 0.05
TOKEN = "bench-token"


@dataclass(frozen=True, slots=True)
class Options:
    slots: list[int]
    warmup: float
    window: float
    windows: int
    ready_timeout: float
    budget: float
    confirm_windows: int = 5
    """Windows of the best N measured again (0: not measured again)."""
    pin: bool = False


@dataclass(frozen=True, slots=True)
class Readiness:
    """What the worker said about itself once READY."""

    max_perf: float
    reported_perf: float
    """`max_perf` in its last report to the autoscaler, for the record."""
    benchmark_seconds: float | None
    """From the first /status seen BENCHMARKING to the first seen READY; None if missed."""
    benchmark: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Row:
    slots: int
    readiness: Readiness
    sweep: Sweep

    @property
    def ratio(self) -> float:
        best = self.sweep.sustained.produced
        return self.readiness.max_perf / best if best > 0 else 0.0

    @property
    def ratio_to_sweep(self) -> float:
        best = self.sweep.best.produced
        return self.readiness.max_perf / best if best > 0 else 0.0


def llama_binary() -> Path:
    answer = subprocess.run(
        [str(REPOSITORY / "scripts" / "build-llama-server"), "--print-path"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    binary = Path(answer.stdout.strip())
    if not binary.is_file():
        raise SystemExit(f"llama-server not built ({binary}): run scripts/build-llama-server")
    return binary


def write_model(folder: Path) -> Path:
    path = folder / "tiny-256x4.gguf"
    script = REPOSITORY / "tests" / "support" / "tiny_gguf.py"
    subprocess.run([sys.executable, str(script), str(path), *MODEL_SHAPE], check=True, timeout=60)
    return path


def start_llama_server(binary: Path, model: Path, slots: int, folder: Path) -> ServerProcess:
    command = [
        str(binary),
        "--model", str(model),
        "--alias", "tiny",
        "--host", "127.0.0.1",
        "--port", "0",
        "--parallel", str(slots),
        "--ctx-size", str(slots * CONTEXT_PER_SLOT),
        "--threads", "1",
        "--no-webui",
    ]  # fmt: skip
    # Its own number of HTTP threads (the slots plus 2), as users start it: each is held by an
    # open connection, and the worker keeps to them (`LimitProbe.spare_connections`).
    return ServerProcess("llama-server", command, folder / "llama-server.log", core=None)


async def wait_ready(worker: str, process: ServerProcess, timeout: float) -> Readiness:
    """Poll the worker's /status until READY, timing its BENCHMARKING state on the way."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    deadline = time.monotonic() + timeout
    began: float | None = None
    client_timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(headers=headers, timeout=client_timeout) as session:
        while time.monotonic() < deadline:
            if process.popen.poll() is not None:
                raise RuntimeError(f"the worker exited: {process.log_tail()}")
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with session.get(worker + "/status") as answer:
                    status = await answer.json()
                state = status.get("state")
                if state == "benchmarking" and began is None:
                    began = time.monotonic()
                if state == "ready":
                    seconds = time.monotonic() - began if began is not None else None
                    return Readiness(
                        float(status["max_perf"]), 0.0, seconds, status.get("benchmark") or {}
                    )
                if state == "errored":
                    raise RuntimeError(f"the worker errored: {status.get('error_msg')}")
            await asyncio.sleep(POLL_INTERVAL)
    raise RuntimeError(f"the worker was not ready in {timeout:.0f} s: {process.log_tail()}")


def client_target(worker: str, signer: autoscaler.Signer) -> Target:
    """The worker's benchmark payloads, each in the envelope a client sends."""
    signed = auth_data(signer, worker)
    return Target(
        url=worker + ROUTE,
        payloads=list(llama_worker.benchmark.dataset or []),  # as the worker sends them
        envelope=lambda payload: {"auth_data": signed, "payload": payload},
        produced=processed_tokens,
        requested=workload,
    )


async def measure(slots: int, model: Path, binary: Path, folder: Path, options: Options) -> Row:
    """One slot count: llama-server, the worker before it, READY, then the sweep."""
    signer, reports, fleet = autoscaler.Signer(), autoscaler.Reports(), Fleet()
    async with stand_in_autoscaler(signer, reports) as report_addr:
        try:
            server = fleet.add(start_llama_server(binary, model, slots, folder))
            server_url = await server.wait_listening(60)
            with cores_apart(server.popen.pid) if options.pin else contextlib.nullcontext():
                worker = fleet.add(start_worker(server, server_url, report_addr))
                worker_url = await worker.wait_listening(60)
                readiness = await wait_ready(worker_url, worker, options.ready_timeout)
                reported = float(reports.last_status.get("max_perf") or 0.0)
                readiness = replace(readiness, reported_perf=reported)
                print(
                    f"{slots} slots: READY, max_perf {readiness.max_perf:,.0f} in /status,"
                    f" {reported:,.0f} in the last report",
                    flush=True,
                )
                print(worker_curve(readiness.benchmark), flush=True)
                sweep = await closed_loop(worker_url, signer, slots, options)
        finally:
            await fleet.stop()
    return Row(slots, readiness, sweep)


def start_worker(server: ServerProcess, server_url: str, report_addr: str) -> ServerProcess:
    """`pyworker run llama` in front of `server`, on this process's cores (it inherits them)."""
    folder = server.log_path.parent
    environ = worker_environment(report_addr, folder / "cache")
    environ.update(MODEL_SERVER_URL=server_url, MODEL_LOG=str(server.log_path))
    environ.update(MASTER_TOKEN=TOKEN, WORKER_HOST="127.0.0.1")
    arguments = ["-m", "pyworker", "run", "llama", "--port", "0"]
    log = folder / "worker.log"
    return ServerProcess.python(
        "pyworker", arguments, log, core=None, environ=environ, cwd=REPOSITORY
    )


def worker_curve(benchmark: dict[str, Any]) -> str:
    """The worker's own ramp, as its /status tells it."""
    lines = ["  the worker's ramp:"]
    for step in benchmark.get("curve") or []:
        lines.append(
            f"  {step.get('concurrency', 0):>3} in flight: {step.get('perf', 0.0):8,.0f}/s,"
            f" {step.get('windows', 0)} windows{'' if step.get('steady') else ' (unsteady)'},"
            f" p90 {step.get('p90', 0.0):.3f} s"
        )
    confirmed = benchmark.get("confirmed") or {}
    if confirmed:
        lines.append(
            f"  {confirmed.get('concurrency', 0):>3} in flight again: "
            f"{confirmed.get('perf', 0.0):,.0f}/s over {confirmed.get('windows', 0)} windows"
        )
    lines.append(f"  stopped: {benchmark.get('stopped', '')}; ceiling {benchmark.get('ceiling')}")
    return "\n".join(lines)


async def closed_loop(
    worker: str, signer: autoscaler.Signer, slots: int, options: Options
) -> Sweep:
    def show(step: Step) -> None:
        print(
            f"  {step.in_flight:>3} in flight: {step.produced:8,.0f} produced/s"
            f" {step.requested:8,.0f} requested/s, windows {step.spread:.1%} apart,"
            f" p90 {step.latency_p90:.3f} s, {step.failures} failed",
            flush=True,
        )

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        loop = ClosedLoop(client_target(worker, signer), session)
        levels = concurrency_levels(2 * slots)
        sweep = await loop.sweep(
            levels, options.warmup, options.window, options.windows, show, options.confirm_windows
        )
        if sweep.again is not None:
            print("  again:", end="")
            show(sweep.again)
        return sweep


def benchmark_duration(readiness: Readiness) -> str:
    """As /status was seen, and as the worker says where its benchmark document tells."""
    seconds = readiness.benchmark_seconds
    seen = f"{seconds:.1f} s" if seconds is not None else "< 0.05 s"
    for name in ("seconds", "duration", "elapsed"):
        value = readiness.benchmark.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return f"{seen} (worker: {value:.1f} s)"
    return seen


def table(rows: Sequence[Row]) -> str:
    lines = [
        "| slots | reported max_perf | the sweep's best step (usage tokens) | that N measured"
        " again | ratio | ratio to the sweep's best | benchmark duration |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        best, again = row.sweep.best, row.sweep.again
        chosen = row.readiness.benchmark.get("concurrency")
        at = f" (at {chosen})" if chosen else ""
        measured_again = f"{again.produced:,.0f} tok/s" if again is not None else "-"
        lines.append(
            f"| {row.slots} | {row.readiness.max_perf:,.0f} tok/s{at} |"
            f" {best.produced:,.0f} tok/s (at {best.in_flight} in flight, windows"
            f" {best.spread:.0%} apart) | {measured_again} | {row.ratio:.2f} |"
            f" {row.ratio_to_sweep:.2f} | {benchmark_duration(row.readiness)} |"
        )
    return "\n".join(lines)


async def run(options: Options) -> list[Row]:
    binary = llama_binary()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-truth-") as directory:
        folder = Path(directory)
        model = await asyncio.to_thread(write_model, folder)
        for slots in options.slots:
            run_folder = folder / f"slots-{slots}"
            run_folder.mkdir()
            row = await measure(slots, model, binary, run_folder, options)
            rows.append(row)
            curve = row.sweep.table()
            print(f"\n{slots} slots, the closed-loop curve:\n{curve}\n", flush=True)
    return rows


async def bounded(options: Options) -> list[Row]:
    """`run` within the budget; SIGTERM and SIGINT end it the same way (processes stopped)."""
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        if task is not None:
            loop.add_signal_handler(signum, task.cancel)
    return await asyncio.wait_for(run(options), options.budget)


def parse(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", default="4,8,16", help="llama-server --parallel values")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before each N's windows")
    parser.add_argument("--window", type=float, default=3.0, help="seconds per measured window")
    parser.add_argument("--windows", type=int, default=3, help="measured windows per N")
    parser.add_argument("--ready-timeout", type=float, default=300.0)
    parser.add_argument("--budget", type=float, default=1800.0, help="seconds for the whole run")
    parser.add_argument(
        "--confirm-windows", type=int, default=5, help="windows of the best N measured again"
    )
    parser.add_argument(
        "--pin", action="store_true", help="llama-server on one core, the rest on another"
    )
    arguments = parser.parse_args(argv)
    slots = [int(value) for value in arguments.slots.split(",") if value.strip()]
    if not slots or min(slots) < 1 or arguments.windows < 1 or arguments.window <= 0:
        parser.error("--slots needs positive counts, --window and --windows positive values")
    if arguments.confirm_windows < 0:
        parser.error("--confirm-windows needs 0 or more")
    return Options(
        slots,
        arguments.warmup,
        arguments.window,
        arguments.windows,
        arguments.ready_timeout,
        arguments.budget,
        arguments.confirm_windows,
        arguments.pin,
    )


def main(argv: Sequence[str] | None = None) -> int:
    options = parse(argv)
    started = time.monotonic()
    try:
        rows = asyncio.run(bounded(options))
    except asyncio.CancelledError:
        print("interrupted: every process it started is stopped", file=sys.stderr)
        return 130
    except asyncio.TimeoutError:
        print(f"over the budget of {options.budget:.0f} s: stopped", file=sys.stderr)
        return 1
    print("Command: python -m bench.truth " + " ".join(sys.argv[1:] if argv is None else argv))
    print(
        f"Model: tiny_gguf.py {' '.join(MODEL_SHAPE)}; llama-server --threads 1;"
        f" warm-up {options.warmup:g} s, {options.windows} x {options.window:g} s windows per N,"
        f" {options.confirm_windows} for the best N again;"
        f" {'pinned' if options.pin else 'not pinned'};"
        f" {time.monotonic() - started:.0f} s in all\n"
    )
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
