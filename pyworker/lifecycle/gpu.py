"""The machine's GPUs through NVML: what they are, whether they are fit to serve, how busy they get.

Everything degrades to "no GPU" when NVML is missing (no `pynvml`, no driver, a CPU machine):
an empty inventory, no problems, a sampler that samples nothing, and one INFO log line. A field
a device does not support (NVML's NotSupported and friends) reads as None on its own; it never
spoils the rest of the inventory.

NVML calls are blocking C calls. On the event loop use the `a*` methods (`aopen`, `ainventory`,
`acheck_health`, `asample`), which run them in a thread; the sampler has its own thread.

Units: bytes for memory, watts, degrees Celsius, MHz, percent. "GB" in problem texts means GiB
(2**30 bytes), the unit of nvidia-smi and of GPU memory sizes as sold (an "80 GB" H100 has 79.6).
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import logging
import threading
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from pyworker.backports import StrEnum
from pyworker.lifecycle.supervision import Backoff

logger = logging.getLogger(__name__)

GIB = 1024**3
STOP_TIMEOUT = 10.0

# Constants of nvml.h, fixed by its C ABI; not read from the module so that fakes stay small.
TEMPERATURE_GPU = 0
CLOCK_SM = 1
MEMORY_ERROR_TYPE_UNCORRECTED = 1
VOLATILE_ECC = 0

# Clock event (throttle) reasons that mean the GPU is slowed by something wrong: heat, the board's
# power brake or a hardware fault. Idle, application clocks, the software power cap (normal at
# full load), sync boost and display clocks are left out on purpose.
HARMFUL_CLOCK_REASONS: dict[int, str] = {
    0x0000000000000008: "hardware slowdown",
    0x0000000000000020: "software thermal slowdown",
    0x0000000000000040: "hardware thermal slowdown",
    0x0000000000000080: "hardware power brake",
}

_CLOCK_REASON_CALLS = (
    "nvmlDeviceGetCurrentClocksEventReasons",
    "nvmlDeviceGetCurrentClocksThrottleReasons",  # the name before NVML 12.2
)
_CUDA_VERSION_CALLS = ("nvmlSystemGetCudaDriverVersion_v2", "nvmlSystemGetCudaDriverVersion")


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value if isinstance(value, str) else None


def _integer(value: Any) -> int | None:
    """An NVML reading, or None for anything else: a reading is a 64-bit integer at most."""
    if isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**64:
        return value
    return None


def _milliwatts_to_watts(value: Any) -> float | None:
    milliwatts = _integer(value)
    return None if milliwatts is None else milliwatts / 1000


def _cuda_version(value: Any) -> str | None:
    """NVML encodes CUDA 12.4 as 12040."""
    number = _integer(value)
    return None if number is None else f"{number // 1000}.{number % 1000 // 10}"


@dataclass(frozen=True, slots=True)
class GpuDevice:
    """One GPU as found at start-up; a field is None where the device or driver cannot tell."""

    index: int
    name: str | None = None
    uuid: str | None = None
    memory_total_bytes: int | None = None
    memory_free_bytes: int | None = None
    pcie_generation: int | None = None
    pcie_generation_max: int | None = None
    pcie_width: int | None = None
    pcie_width_max: int | None = None
    power_limit_watts: float | None = None

    @property
    def label(self) -> str:
        return f"GPU {self.index} ({self.name or 'unknown model'})"


@dataclass(frozen=True, slots=True)
class GpuInventory:
    devices: tuple[GpuDevice, ...] = ()
    driver_version: str | None = None
    cuda_version: str | None = None

    @property
    def count(self) -> int:
        return len(self.devices)

    def fingerprint(self) -> str:
        """What a cached benchmark depends on: models, memory sizes and driver (not the UUIDs)."""
        models = ",".join(f"{device.name}/{device.memory_total_bytes}" for device in self.devices)
        return f"{self.count}x[{models}] driver={self.driver_version}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class GpuSample:
    """One reading of one GPU; a field is None where the device cannot tell."""

    index: int
    timestamp: float
    utilization_percent: float | None = None
    memory_used_bytes: float | None = None
    power_watts: float | None = None
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


class NvmlState(StrEnum):
    NEW = "new"  # not opened yet
    AVAILABLE = "available"
    UNAVAILABLE = "unavailable"  # no NVML: the machine has no usable GPU
    CLOSED = "closed"  # final: a closed monitor answers like one without a GPU


class GpuMonitor:
    """Owns the NVML session: inventory, health checks and single readings of every GPU.

    `nvml` is the module to use (tests pass a fake); by default `pynvml` is imported on `open()`.
    Every method opens NVML on first use; all are safe to call from several threads.
    """

    def __init__(self, nvml: ModuleType | None = None) -> None:
        self._given = nvml
        self._nvml: Any = None
        self._handles: list[tuple[int, Any]] = []  # (index, handle or None if unreachable)
        self._unreachable: dict[int, str] = {}
        self._state = NvmlState.NEW
        self._lock = threading.Lock()

    @property
    def state(self) -> NvmlState:
        return self._state

    @property
    def available(self) -> bool:
        return self._state is NvmlState.AVAILABLE

    def open(self) -> bool:
        """Start NVML and find the GPUs; False (never an exception) when there is no NVML."""
        with self._lock:
            if self._state is NvmlState.NEW:
                self._start()
            return self._state is NvmlState.AVAILABLE

    def close(self) -> None:
        """Shut NVML down (stop samplers first); later calls answer as if there were no GPU."""
        with self._lock:
            if self._state is NvmlState.AVAILABLE:
                try:
                    self._nvml.nvmlShutdown()
                except self._nvml.NVMLError as error:
                    logger.debug("nvmlShutdown failed: %s", error)
            self._state = NvmlState.CLOSED
            self._handles = []
            self._unreachable = {}

    def __enter__(self) -> GpuMonitor:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def inventory(self) -> GpuInventory:
        if not self.open():
            return GpuInventory()
        return GpuInventory(
            devices=tuple(self._device(index, handle) for index, handle in self._handles),
            driver_version=_text(self._read("nvmlSystemGetDriverVersion")),
            cuda_version=_cuda_version(self._read_first(_CUDA_VERSION_CALLS)),
        )

    def check_health(
        self, gpu_ram_gb: float | None = None, *, under_load: bool = False
    ) -> list[str]:
        """What is wrong with the GPUs, one sentence per problem; empty when all is well.

        `gpu_ram_gb` is the free memory each GPU must have (so check before the model loads).
        PCIe: a link narrower than its maximum width is always a problem; a generation below the
        maximum is one only when `under_load`, since idle GPUs lower their link speed to save power.
        """
        if not self.open():
            return []
        problems: list[str] = []
        for index, handle in self._handles:
            if handle is None:
                problems.append(f"GPU {index}: NVML cannot reach it ({self._unreachable[index]})")
                continue
            label = GpuDevice(index, _text(self._read("nvmlDeviceGetName", handle))).label
            problems.extend(f"{label}: {problem}" for problem in self._problems(handle, under_load))
            if gpu_ram_gb is not None:
                memory = self._read("nvmlDeviceGetMemoryInfo", handle)
                free = _integer(getattr(memory, "free", None))
                if free is not None and free < gpu_ram_gb * GIB:
                    problems.append(
                        f"{label}: {free / GIB:.1f} GB VRAM free, {gpu_ram_gb:g} GB required"
                    )
        return problems

    def sample(self) -> tuple[GpuSample, ...]:
        """One reading of every reachable GPU."""
        if not self.open():
            return ()
        return tuple(
            self._sample(index, handle) for index, handle in self._handles if handle is not None
        )

    def sampler(self, interval: float = 0.1) -> GpuSampler:
        return GpuSampler(self, interval)

    async def aopen(self) -> bool:
        return await asyncio.to_thread(self.open)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    async def ainventory(self) -> GpuInventory:
        return await asyncio.to_thread(self.inventory)

    async def acheck_health(
        self, gpu_ram_gb: float | None = None, *, under_load: bool = False
    ) -> list[str]:
        return await asyncio.to_thread(self.check_health, gpu_ram_gb, under_load=under_load)

    async def asample(self) -> tuple[GpuSample, ...]:
        return await asyncio.to_thread(self.sample)

    def _start(self) -> None:
        nvml: Any = self._given
        if nvml is None:
            try:
                nvml = importlib.import_module("pynvml")
            except ImportError as error:
                self._set_unavailable(f"pynvml cannot be imported ({error})")
                return
        try:
            nvml.nvmlInit()
        except Exception as error:  # NVMLError, or anything a broken install raises: no GPU
            self._set_unavailable(f"NVML did not start ({error})")
            return
        self._nvml = nvml
        self._state = NvmlState.AVAILABLE
        count = _integer(self._read("nvmlDeviceGetCount")) or 0
        for index in range(count):
            try:
                self._handles.append((index, nvml.nvmlDeviceGetHandleByIndex(index)))
            except nvml.NVMLError as error:
                logger.warning("GPU %d cannot be reached through NVML: %s", index, error)
                self._handles.append((index, None))
                self._unreachable[index] = str(error)
        logger.info("NVML started: %d GPU(s)", count)

    def _set_unavailable(self, reason: str) -> None:
        self._state = NvmlState.UNAVAILABLE  # final, so this is logged once
        logger.info("no GPU: %s", reason)

    def _read(self, name: str, *args: Any) -> Any:
        """Call NVML function `name`; None if this module or device does not have it."""
        function = getattr(self._nvml, name, None)
        if function is None:
            return None
        try:
            return function(*args)
        except self._nvml.NVMLError as error:
            logger.debug("%s: %s", name, error)
            return None

    def _read_first(self, names: tuple[str, ...], *args: Any) -> Any:
        """The first of `names` that answers: a newer NVML call, then the one it replaced."""
        for name in names:
            value = self._read(name, *args)
            if value is not None:
                return value
        return None

    def _device(self, index: int, handle: Any) -> GpuDevice:
        if handle is None:
            return GpuDevice(index)
        memory = self._read("nvmlDeviceGetMemoryInfo", handle)
        return GpuDevice(
            index=index,
            name=_text(self._read("nvmlDeviceGetName", handle)),
            uuid=_text(self._read("nvmlDeviceGetUUID", handle)),
            memory_total_bytes=_integer(getattr(memory, "total", None)),
            memory_free_bytes=_integer(getattr(memory, "free", None)),
            pcie_generation=_integer(self._read("nvmlDeviceGetCurrPcieLinkGeneration", handle)),
            pcie_generation_max=_integer(self._read("nvmlDeviceGetMaxPcieLinkGeneration", handle)),
            pcie_width=_integer(self._read("nvmlDeviceGetCurrPcieLinkWidth", handle)),
            pcie_width_max=_integer(self._read("nvmlDeviceGetMaxPcieLinkWidth", handle)),
            power_limit_watts=_milliwatts_to_watts(
                self._read("nvmlDeviceGetPowerManagementLimit", handle)
            ),
        )

    def _problems(self, handle: Any, under_load: bool) -> list[str]:
        problems = []
        errors = _integer(
            self._read(
                "nvmlDeviceGetTotalEccErrors", handle, MEMORY_ERROR_TYPE_UNCORRECTED, VOLATILE_ECC
            )
        )
        if errors:
            problems.append(f"{errors} uncorrected ECC errors since the driver loaded")
        reasons = _integer(self._read_first(_CLOCK_REASON_CALLS, handle)) or 0
        slowdowns = [text for bit, text in HARMFUL_CLOCK_REASONS.items() if reasons & bit]
        if slowdowns:
            problems.append(f"clocks slowed by {', '.join(slowdowns)}")
        width = _integer(self._read("nvmlDeviceGetCurrPcieLinkWidth", handle))
        width_max = _integer(self._read("nvmlDeviceGetMaxPcieLinkWidth", handle))
        if width and width_max and width < width_max:
            problems.append(f"PCIe link degraded to x{width} (x{width_max} possible)")
        if under_load:
            generation = _integer(self._read("nvmlDeviceGetCurrPcieLinkGeneration", handle))
            generation_max = _integer(self._read("nvmlDeviceGetMaxPcieLinkGeneration", handle))
            if generation and generation_max and generation < generation_max:
                problems.append(
                    f"PCIe link at gen {generation} under load (gen {generation_max} possible)"
                )
        return problems

    def _sample(self, index: int, handle: Any) -> GpuSample:
        utilization = self._read("nvmlDeviceGetUtilizationRates", handle)
        memory = self._read("nvmlDeviceGetMemoryInfo", handle)
        return GpuSample(
            index=index,
            timestamp=time.time(),
            utilization_percent=_integer(getattr(utilization, "gpu", None)),
            memory_used_bytes=_integer(getattr(memory, "used", None)),
            power_watts=_milliwatts_to_watts(self._read("nvmlDeviceGetPowerUsage", handle)),
            temperature_celsius=_integer(
                self._read("nvmlDeviceGetTemperature", handle, TEMPERATURE_GPU)
            ),
            sm_clock_mhz=_integer(self._read("nvmlDeviceGetClockInfo", handle, CLOCK_SM)),
        )


MAX_SAMPLE_FAILURES = 10
"""Failed readings in a row after which the sampler thread gives up."""


class GpuSampler:
    """Samples every GPU on a background thread every `interval` seconds, in constant memory.

    `start()` opens NVML if needed (blocking: on the event loop, `await monitor.aopen()` first);
    `stop()` waits for at most one reading in flight (`astop()` does so off the loop).
    Without a GPU both are no-ops and the summary is empty.
    """

    def __init__(self, monitor: GpuMonitor, interval: float = 0.1) -> None:
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
