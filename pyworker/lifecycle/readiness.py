"""Driving the worker through its states: STARTING → LOADING → BENCHMARKING → READY.

Ready means: the model is loaded (its load line seen in the log, or, for servers without a
useful log, its health path answering), the benchmark done (or its cached result valid for
these GPUs and this model), the health path answering 200 when one is configured, and the
public key loaded unless unsecured (a worker that cannot get it is ERRORED, saying so, until
it arrives). A fatal error line or a failing health check makes the worker ERRORED with an
`error_msg` that says why; when the model server comes back (its load
line again, or its health recovering) the worker goes through readiness again. A pass that
failed (the benchmark, say) is also tried again after a backoff, the worker errored meanwhile.
A model that gives no load signal within its load deadline (pyworker.config.load_deadline) makes the
worker ERRORED too, until it loads. A model loaded in the worker's own process
(pyworker.lifecycle.in_process) is loaded when its lifecycle is entered; its failure to load
is the worker's error.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from pyworker.config import Pattern, PatternConfig, RouteConfig, WorkerConfig
from pyworker.config.dataset import BenchmarkError, load_dataset
from pyworker.config.load_deadline import LoadDeadline, never_entered_message, never_loaded_message
from pyworker.lifecycle.benchmark import (
    Benchmark,
    BenchmarkResult,
    cache_key,
    read_cache,
    write_cache,
    write_marker,
)
from pyworker.lifecycle.gpu import GpuInventory, GpuMonitor, GpuSampleSummary
from pyworker.lifecycle.in_process import InProcessModel, LoadFailed
from pyworker.lifecycle.logfollow import LineKind, LogFollower, LogPattern
from pyworker.lifecycle.public_key import KeyFetch
from pyworker.lifecycle.state import WorkerState, WorkerStatus
from pyworker.lifecycle.supervision import Backoff, describe, run_all
from pyworker.upstream.errors import UpstreamError
from pyworker.upstream.model import ModelClient

logger = logging.getLogger(__name__)

MAX_ERROR_LINE = 500
RETRY_FIRST = 10.0
RETRY_MAXIMUM = 300.0
"""A failed readiness pass is tried again after 10 s, doubling up to 5 minutes."""
KEY_CAUSE = "public key"


class KeyMissing(Exception):
    """The pass is done but for the public key, which REPORT_ADDR did not give: the worker
    errs, saying so, until the key arrives (its fetch goes on meanwhile)."""


def default_cache_file() -> Path:
    folder = os.environ.get("PYWORKER_CACHE_DIR")
    base = Path(folder) if folder else Path.home() / ".cache" / "pyworker"
    return base / "benchmark.json"


def log_patterns(config: WorkerConfig) -> list[LogPattern]:
    server = config.model_server
    patterns: list[LogPattern] = []
    for kind, items in (
        (LineKind.LOADED, server.load_patterns),
        (LineKind.ERROR, server.error_patterns),
        (LineKind.INFO, server.info_patterns),
    ):
        patterns.extend(_pattern(kind, item) for item in items)
    return patterns


def _pattern(kind: LineKind, item: Pattern) -> LogPattern:
    if isinstance(item, PatternConfig):
        return LogPattern(kind, item.text, regex=item.regex, fatal=item.fatal)
    return LogPattern(kind, item)


async def probe_health(model: ModelClient, path: str, timeout: float = 5.0) -> bool:
    try:
        return await model.probe(path, timeout) == 200
    except UpstreamError:
        return False


class Readiness:
    """Owns the worker's state transitions; run it as one background task."""

    def __init__(
        self,
        config: WorkerConfig,
        status: WorkerStatus,
        model: ModelClient,
        gpu: GpuMonitor,
        key: KeyFetch | None,
        *,
        poll_interval: float = 0.2,
        load_deadline: LoadDeadline | None = None,
        in_process: InProcessModel | None = None,
    ) -> None:
        self.config = config
        self.in_process = in_process
        self.status = status
        self.model = model
        self.benchmark: BenchmarkResult | None = None
        self.gpu = gpu
        self.inventory = GpuInventory()
        self.key = key
        self._loaded = asyncio.Event()
        self.poll_interval = poll_interval
        self.load_deadline = load_deadline
        self._load_seen = asyncio.Event()
        """Set at the model's first load signal: what the load deadline waits for."""
        self.follower: LogFollower | None = None
        self.error_lines = 0
        self.error_cause = ""
        self._pass: asyncio.Task[None] | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._backoff: Backoff | None = None
        self.retry_first = RETRY_FIRST
        self.retry_maximum = RETRY_MAXIMUM

    @property
    def route(self) -> RouteConfig:
        wanted = self.config.benchmark.route
        return next((r for r in self.config.routes if r.path == wanted), self.config.routes[0])

    async def run(self) -> None:
        self._loaded.clear()  # a run restarted by its supervisor starts from the log's start
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        await self.gpu.aopen()
        self.inventory = await self.gpu.ainventory()
        problems = await self.gpu.acheck_health(self.config.gpu_ram)
        if problems:
            self.status.set_state(WorkerState.ERRORED, "; ".join(problems))
            return
        self.status.set_state(WorkerState.LOADING)
        server = self.config.model_server
        watchers = []
        if server.log_file:
            self.follower = LogFollower(
                server.log_file, log_patterns(self.config), poll_interval=self.poll_interval
            )
            watchers.append(self._watch_log(self.follower))
        if self.in_process is not None:
            watchers.append(self._load_in_process(self.in_process))
        elif server.readiness_source == "health":
            watchers.append(self._wait_for_health_then_load())
        if self.load_deadline is not None:
            watchers.append(self._enforce_load_deadline(self.load_deadline))
        if self.key is not None:
            watchers.append(self._recover_when_the_key_loads(self.key))
        await run_all(self._drive(), *watchers)

    async def _enforce_load_deadline(self, deadline: LoadDeadline) -> None:
        """ERRORED, reported at once, when the model gives no load signal in time."""
        before = await asyncio.to_thread(self.loaded_here_before)
        seconds = deadline.seconds(before)
        if seconds <= 0:
            return
        logger.info(
            "waiting up to %g s for the model to load (%s)",
            seconds,
            "it loaded here before" if before else "first start on this machine",
        )
        seen = asyncio.ensure_future(self._load_seen.wait())
        try:
            done, _ = await asyncio.wait({seen}, timeout=seconds)
        finally:
            seen.cancel()
        if done:
            return
        if self.in_process is not None:
            message = never_entered_message(self.in_process.name, seconds, before)
        else:
            message = never_loaded_message(seconds, before)
        self._fail(message, cause="load deadline")

    def loaded_here_before(self) -> bool:
        """Whether the benchmark cache holds a result for these GPUs and this model."""
        key, cache_file = self._cache_entry()
        return read_cache(cache_file, key) is not None

    # --- what says the model is loaded, or broken ----------------------------------------
    async def _watch_log(self, follower: LogFollower) -> None:
        async for event in follower.events():
            if event.kind is LineKind.LOADED:
                logger.info("model server load line seen")
                if self.config.model_server.readiness_source == "log":
                    self._loaded.set()
            elif event.kind is LineKind.ERROR:
                self.error_lines += 1
                if event.fatal:
                    self._fail(f"model server error: {event.line[:MAX_ERROR_LINE]}", cause="log")
            elif event.kind is LineKind.INFO:
                # What info patterns are for: progress (downloads, compilation) in our log.
                logger.info("model server: %s", event.line[:MAX_ERROR_LINE])

    async def _wait_for_health_then_load(self) -> None:
        path = self.config.model_server.health_path
        if path:
            while not await probe_health(self.model, path):
                await asyncio.sleep(self.poll_interval)
        self._loaded.set()

    async def _recover_when_the_key_loads(self, key: KeyFetch) -> None:
        await key.loaded.wait()
        if self.status.state is WorkerState.ERRORED and self.error_cause == KEY_CAUSE:
            logger.info("public key loaded: readiness again")
            self._loaded.set()

    async def _load_in_process(self, model: InProcessModel) -> None:
        """Loaded means the lifecycle is entered; its failure is the worker's error."""
        try:
            await model.load()
        except LoadFailed as error:
            message = str(error)[:MAX_ERROR_LINE]
            logger.error("%s", message)
            self.error_cause = "lifecycle"
            # Said even over the load deadline's error: this one is the cause.
            self.status.set_state(WorkerState.ERRORED, message)
            return
        self._loaded.set()

    def _fail(self, message: str, cause: str) -> None:
        logger.error("%s", message)
        if self.status.state is WorkerState.ERRORED:
            return  # the first error since the worker was last ready is usually the root cause
        self.error_cause = cause
        if self._pass is not None:
            self._pass.cancel()
        self.status.set_state(WorkerState.ERRORED, message)

    # --- the readiness passes -------------------------------------------------------------
    async def _drive(self) -> None:
        while True:
            await self._loaded.wait()
            self._loaded.clear()
            self._load_seen.set()
            if self._retry is not None:
                self._retry.cancel()
                self._retry = None
            self._pass = asyncio.create_task(self._readiness_pass())
            try:
                await asyncio.wait({self._pass})
            except asyncio.CancelledError:
                self._pass.cancel()
                raise
            finished, self._pass = self._pass, None
            if finished.cancelled():
                continue  # cut short by an error line; the next load line starts again
            error = finished.exception()
            if isinstance(error, KeyMissing):
                self._fail(str(error), cause=KEY_CAUSE)
                if self.key is not None and self.key.loaded.is_set():
                    self._loaded.set()  # it came meanwhile; else its watcher starts the pass
                continue
            if isinstance(error, BenchmarkError):
                self._fail(f"benchmark failed: {error}", cause="benchmark")
                self._retry_later()
                continue
            if error is not None:
                # Anything else the engine or a hook can make a pass raise: the worker says so.
                logger.error("readiness pass failed", exc_info=error)
                self._fail(f"readiness failed: {describe(error)}", cause="readiness")
                self._retry_later()
                continue
            self._backoff = None  # ready: the next failure is retried soon again
            if self.config.model_server.health_path:
                await self._watch_health()

    def _retry_later(self) -> None:
        """A failed pass is tried again after a backoff, unless a load line comes first.

        The worker stays errored meanwhile, with its error_msg; a model server that recovers
        by itself (a dropped connection, a slow start) brings the worker back without a restart.
        """
        if self._backoff is None:
            self._backoff = Backoff(self.retry_first, self.retry_maximum, stable_after=math.inf)
        delay = self._backoff.delay(0.0)
        logger.info("readiness: next try in %.0f s", delay)
        self._retry = asyncio.get_running_loop().call_later(delay, self._loaded.set)

    async def _readiness_pass(self) -> None:
        if self.status.state is not WorkerState.LOADING:
            self.status.set_state(WorkerState.LOADING)
        self.status.set_state(WorkerState.BENCHMARKING)
        perf = self.config.perf or (await self._benchmark()).perf
        self.status.set_perf(perf)
        path = self.config.model_server.health_path
        if path:
            deadline = time.monotonic() + self.config.model_server.ready_timeout
            while not await probe_health(self.model, path):
                if time.monotonic() > deadline:
                    raise BenchmarkError(f"health check {path} did not answer 200 in time")
                await asyncio.sleep(self.poll_interval)
        if self.key is not None:
            await _wait_for_key(self.key)
        self.status.set_state(WorkerState.READY)

    async def _benchmark(self) -> BenchmarkResult:
        settings = self.config.benchmark
        route = self.route
        key, cache_file = self._cache_entry()
        cached = await asyncio.to_thread(read_cache, cache_file, key)
        if cached is not None:
            logger.info("benchmark cache hit: perf %.2f/s", cached.perf)
            previous = self.benchmark
            if previous is not None and previous.key == key:
                cached = replace(previous, cached=True)  # keeps the curve measured here
            # As a measured benchmark does: this working folder may not have the marker yet.
            await asyncio.to_thread(write_marker, self._reference_file(), cached.perf)
            self.benchmark = cached
            return cached
        payloads = await asyncio.to_thread(load_dataset, settings)
        sampler = self.gpu.sampler()
        await asyncio.to_thread(sampler.start)
        try:
            result = await Benchmark(self.model, route, settings).run(payloads)
        finally:
            summary: GpuSampleSummary = await sampler.astop()
        result.key = key
        result.gpu = _gpu_figures(summary, result.perf)
        logger.info("benchmark done: perf %.2f/s", result.perf)
        await asyncio.to_thread(write_cache, cache_file, result, self._reference_file())
        self.benchmark = result
        return result

    def _cache_entry(self) -> tuple[str, Path]:
        """The benchmark cache key for these GPUs, this model and route, and its file."""
        settings = self.config.benchmark
        key = cache_key(settings, self.route, self._identity())
        cache_file = Path(settings.cache_file) if settings.cache_file else default_cache_file()
        return key, cache_file

    def _reference_file(self) -> Path | None:
        """The reference worker's marker, relative to the working folder; None: not written."""
        reference = self.config.benchmark.reference_file
        return Path(reference) if reference else None

    def _identity(self) -> dict[str, Any]:
        server = self.config.model_server
        return {
            "gpus": [device.uuid for device in self.inventory.devices],
            "gpu": self.inventory.fingerprint(),
            "model": server.model_id or self.config.name,
        }

    async def _watch_health(self) -> None:
        """While ready, poll health; after enough failures go ERRORED until it recovers.

        An error from the log is only cleared by the load line again (the server may well
        still answer its health check while broken), unless health is all there is.
        """
        server = self.config.model_server
        assert server.health_path is not None
        failures = 0
        while self.status.ready:
            await asyncio.sleep(server.health_interval)
            if await probe_health(self.model, server.health_path):
                failures = 0
                continue
            failures += 1
            if failures >= server.health_failures and self.status.ready:
                self._fail(f"model server health check {server.health_path} failing", "health")
        if self.status.state is not WorkerState.ERRORED:
            return
        if self.error_cause != "health" and server.readiness_source == "log":
            return
        while not await probe_health(self.model, server.health_path):
            await asyncio.sleep(server.health_interval)
        logger.info("model server health recovered")
        self._loaded.set()


async def _wait_for_key(key: KeyFetch) -> None:
    """Until the key loads; `KeyMissing` at once if a whole round over REPORT_ADDR failed."""
    if not key.loaded.is_set() and not key.failed.is_set():
        waits = {asyncio.ensure_future(key.loaded.wait()), asyncio.ensure_future(key.failed.wait())}
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
    if not key.loaded.is_set():
        raise KeyMissing(f"public key unavailable from REPORT_ADDR: {key.problem}")


def _gpu_figures(summary: GpuSampleSummary, perf: float) -> dict[str, Any]:
    figures = summary.to_dict()
    figures["perf_per_gpu"] = summary.perf_per_gpu(perf)
    figures["perf_per_watt"] = summary.perf_per_watt(perf)
    return figures
