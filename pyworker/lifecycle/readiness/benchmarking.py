"""The readiness pass's figure: the benchmark's cached result for these GPUs and this model,
or a measurement, GPU sampling around it, written to the cache for the next start."""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from pyworker.config import RouteConfig, WorkerConfig
from pyworker.config.dataset import load_dataset
from pyworker.lifecycle.benchmark import (
    Benchmark,
    BenchmarkResult,
    cache_key,
    read_cache,
    write_cache,
    write_marker,
)
from pyworker.lifecycle.declared import limit_connections, probe_declared, still_declared
from pyworker.lifecycle.gpu import GpuInventory, GpuMonitor, GpuSampleSummary
from pyworker.upstream.model import ModelClient

logger = logging.getLogger(__package__)


def default_cache_file() -> Path:
    folder = os.environ.get("PYWORKER_CACHE_DIR")
    base = Path(folder) if folder else Path.home() / ".cache" / "pyworker"
    return base / "benchmark.json"


class BenchmarkRunner:
    """Runs the benchmark, or takes its cached figure; keeps the last result for `/status`."""

    def __init__(self, config: WorkerConfig, model: ModelClient, gpu: GpuMonitor) -> None:
        self.config = config
        self.model = model
        self.gpu = gpu
        self.result: BenchmarkResult | None = None
        self.inventory = GpuInventory()
        """The GPUs the figure is for: part of the cache key (readiness reads it at start)."""

    @property
    def route(self) -> RouteConfig:
        wanted = self.config.benchmark.route
        return next((r for r in self.config.routes if r.path == wanted), self.config.routes[0])

    async def limit_connections(self) -> None:
        """Where no benchmark runs (a set `perf`), the engine's limit is still read where it
        caps the worker's connections (`LimitProbe.spare_connections`)."""
        settings = self.config.benchmark
        if settings.limit_probe is None or settings.limit_probe.spare_connections is None:
            return
        declared = await probe_declared(self.model, self.route, settings)
        limit_connections(self.model, settings, declared)

    async def measure(self) -> BenchmarkResult:
        settings = self.config.benchmark
        route = self.route
        key, cache_file = self.cache_entry()
        declared = await probe_declared(self.model, route, settings)
        limit_connections(self.model, settings, declared)
        cached = await asyncio.to_thread(read_cache, cache_file, key)
        if cached is not None and still_declared(cached.declared, declared):
            logger.info("benchmark cache hit: perf %.2f/s", cached.perf)
            previous = self.result
            if previous is not None and previous.key == key:
                cached = replace(previous, cached=True)  # keeps the curve measured here
            # As a measured benchmark does: this working folder may not have the marker yet.
            await asyncio.to_thread(write_marker, self._reference_file(), cached.perf)
            self.result = cached
            return cached
        payloads = await asyncio.to_thread(load_dataset, settings)
        sampler = self.gpu.sampler()
        await asyncio.to_thread(sampler.start)
        try:
            result = await Benchmark(self.model, route, settings, declared).run(payloads)
        finally:
            summary: GpuSampleSummary = await sampler.astop()
        result.key = key
        result.gpu = _gpu_figures(summary, result.perf)
        logger.info("benchmark done: perf %.2f/s", result.perf)
        await asyncio.to_thread(write_cache, cache_file, result, self._reference_file())
        self.result = result
        return result

    def loaded_here_before(self) -> bool:
        """Whether the benchmark cache holds a result for these GPUs and this model."""
        key, cache_file = self.cache_entry()
        return read_cache(cache_file, key) is not None

    def cache_entry(self) -> tuple[str, Path]:
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


def _gpu_figures(summary: GpuSampleSummary, perf: float) -> dict[str, Any]:
    figures = summary.to_dict()
    figures["perf_per_gpu"] = summary.perf_per_gpu(perf)
    figures["perf_per_watt"] = summary.perf_per_watt(perf)
    return figures
