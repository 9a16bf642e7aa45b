"""How busy the GPUs get: one reading of every GPU, and a sampler that keeps peak and mean.

The sampler reads on its own thread (NVML calls block) and keeps constant memory however long
it runs; the benchmark starts one around its run and reports the summary.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

from pyworker.lifecycle.gpu.nvml import (
    CLOCK_SM,
    TEMPERATURE_GPU,
    NvmlSession,
    integer,
    logger,
    milliwatts_to_watts,
)
from pyworker.lifecycle.supervision import Backoff

STOP_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class GpuSample:
    """One reading of one GPU; a field is None where the device cannot tell."""

    index: int
    timestamp: float
    """Seconds since the epoch."""
    utilization_percent: float | None = None
    """Share of the last sample period in which a kernel ran (NVML's `gpu` utilization)."""
    memory_used_bytes: float | None = None
    power_watts: float | None = None
    """The whole board's draw, for the perf-per-watt the benchmark reports."""
    temperature_celsius: float | None = None
    sm_clock_mhz: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


METRICS = (
    "utilization_percent",
    "memory_used_bytes",
    "power_watts",
    "temperature_celsius",
    "sm_clock_mhz",
)


@dataclass(frozen=True, slots=True)
class MetricSummary:
    peak: float | None = None
    mean: float | None = None
    count: int = 0


@dataclass(frozen=True, slots=True)
class GpuMetrics:
    """Peak and mean of each metric of one GPU over a sampling run."""

    index: int
    utilization_percent: MetricSummary
    memory_used_bytes: MetricSummary
    power_watts: MetricSummary
    temperature_celsius: MetricSummary
    sm_clock_mhz: MetricSummary


@dataclass(frozen=True, slots=True)
class GpuSampleSummary:
    duration_seconds: float = 0.0
    sample_count: int = 0
    gpus: tuple[GpuMetrics, ...] = ()

    def perf_per_gpu(self, perf: float) -> float | None:
        """`perf` (workload units per second) divided by the number of GPUs; None with none."""
        return perf / len(self.gpus) if self.gpus else None

    def perf_per_watt(self, perf: float) -> float | None:
        """`perf` over the mean power drawn by all GPUs together; None if any draw is unknown."""
        draws = [gpu.power_watts.mean for gpu in self.gpus]
        if not draws or any(draw is None for draw in draws):
            return None
        total = sum(draw for draw in draws if draw is not None)
        return perf / total if total > 0 else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Accumulator:
    """Running peak and mean: constant memory however long the sampler runs."""

    __slots__ = ("count", "peak", "total")

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.peak: float | None = None

    def add(self, value: float | None) -> None:
        if value is None:
            return
        self.count += 1
        self.total += value
        self.peak = value if self.peak is None else max(self.peak, value)

    def summary(self) -> MetricSummary:
        mean = self.total / self.count if self.count else None
        return MetricSummary(self.peak, mean, self.count)


def read_samples(session: NvmlSession) -> tuple[GpuSample, ...]:
    """One reading of every GPU an opened session reaches."""
    return tuple(
        _read_sample(session, index, handle)
        for index, handle in session.handles
        if handle is not None
    )


def _read_sample(session: NvmlSession, index: int, handle: Any) -> GpuSample:
    read = session.read
    utilization = read("nvmlDeviceGetUtilizationRates", handle)
    memory = read("nvmlDeviceGetMemoryInfo", handle)
    return GpuSample(
        index=index,
        timestamp=time.time(),
        utilization_percent=integer(getattr(utilization, "gpu", None)),
        memory_used_bytes=integer(getattr(memory, "used", None)),
        power_watts=milliwatts_to_watts(read("nvmlDeviceGetPowerUsage", handle)),
        temperature_celsius=integer(read("nvmlDeviceGetTemperature", handle, TEMPERATURE_GPU)),
        sm_clock_mhz=integer(read("nvmlDeviceGetClockInfo", handle, CLOCK_SM)),
    )


class Readings(Protocol):
    """What a sampler reads from: `GpuMonitor`, or a stand-in in tests."""

    def open(self) -> bool: ...

    def sample(self) -> tuple[GpuSample, ...]: ...


MAX_SAMPLE_FAILURES = 10
"""Failed readings in a row after which the sampler thread gives up."""


class GpuSampler:
    """Samples every GPU on a background thread every `interval` seconds, in constant memory.

    `start()` opens NVML if needed (blocking: on the event loop, `await monitor.aopen()` first);
    `stop()` waits for at most one reading in flight (`astop()` does so off the loop).
    Without a GPU both are no-ops and the summary is empty.
    """

    def __init__(self, monitor: Readings, interval: float = 0.1) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self._monitor = monitor
        self._interval = interval
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._accumulators: dict[int, dict[str, _Accumulator]] = {}
        self._last: tuple[GpuSample, ...] = ()
        self._samples_taken = 0
        self._started_at = 0.0
        self._stopped_at: float | None = None
        self._run_number = 0

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def samples_taken(self) -> int:
        """Readings taken since `start()` (one reading covers every GPU)."""
        return self._samples_taken

    def last_sample(self) -> tuple[GpuSample, ...]:
        """The latest reading of every GPU; empty before the first one or without a GPU."""
        return self._last

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the GPU sampler is already running")
        with self._lock:
            self._accumulators = {}
            self._last = ()
            self._samples_taken = 0
            self._started_at = time.monotonic()
            self._stopped_at = None
            self._run_number += 1
        # Each run has its own stop event, so a thread that outlived its stop() never resumes.
        self._stopping = threading.Event()
        if not self._monitor.open():
            return
        self._thread = threading.Thread(
            target=self._run,
            args=(self._run_number, self._stopping),
            name="gpu-sampler",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> GpuSampleSummary:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=self._interval + STOP_TIMEOUT)
            if self._thread.is_alive():  # a lost GPU can hang NVML calls for a long time
                logger.warning("GPU sampler thread did not stop within %.0f s", STOP_TIMEOUT)
            self._thread = None
        if self._stopped_at is None:
            self._stopped_at = time.monotonic()
        return self.summary()

    async def astop(self) -> GpuSampleSummary:
        return await asyncio.to_thread(self.stop)

    def summary(self) -> GpuSampleSummary:
        """Peak and mean so far (the sampler may still be running)."""
        with self._lock:
            end = self._stopped_at if self._stopped_at is not None else time.monotonic()
            gpus = tuple(
                GpuMetrics(
                    index,
                    *(accumulators[metric].summary() for metric in METRICS),
                )
                for index, accumulators in sorted(self._accumulators.items())
            )
            return GpuSampleSummary(
                duration_seconds=max(end - self._started_at, 0.0) if self._started_at else 0.0,
                sample_count=self._samples_taken,
                gpus=gpus,
            )

    def _run(self, run_number: int, stopping: threading.Event) -> None:
        """Sample until stopped; a failing reading is logged and retried after a backoff.

        After `MAX_SAMPLE_FAILURES` failures in a row the GPU is taken as gone and the thread
        ends, so a broken NVML costs a few log lines, never a thread spinning for ever.
        """
        backoff = Backoff(first=self._interval, maximum=max(self._interval, 5.0))
        failures = 0
        while True:
            wait = self._interval
            try:
                samples = self._monitor.sample()
            except Exception:
                failures += 1
                logger.exception("GPU sampling failed (%d in a row)", failures)
                if failures >= MAX_SAMPLE_FAILURES:
                    logger.error("GPU sampler stops after %d failures in a row", failures)
                    return
                wait = backoff.delay(0.0)
            else:
                failures = 0
                self._record(run_number, samples)
            if stopping.wait(wait):
                return

    def _record(self, run_number: int, samples: tuple[GpuSample, ...]) -> None:
        with self._lock:
            if run_number != self._run_number:
                return
            for sample in samples:
                accumulators = self._accumulators.get(sample.index)
                if accumulators is None:
                    accumulators = {metric: _Accumulator() for metric in METRICS}
                    self._accumulators[sample.index] = accumulators
                for metric in METRICS:
                    accumulators[metric].add(getattr(sample, metric))
            self._last = samples
            self._samples_taken += 1
