"""Whether the GPUs are fit to serve: ECC errors, harmful clock slowdowns, PCIe links, free memory.

Each problem is one sentence naming the GPU; the readiness step fails the worker on any.
"GB" in these sentences means GiB (2**30 bytes), the unit of nvidia-smi and of GPU memory sizes
as sold (an "80 GB" H100 has 79.6).
"""

from __future__ import annotations

from typing import Any

from pyworker.lifecycle.gpu.inventory import GpuDevice
from pyworker.lifecycle.gpu.nvml import (
    GIB,
    MEMORY_ERROR_TYPE_UNCORRECTED,
    VOLATILE_ECC,
    NvmlSession,
    integer,
    text,
)

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


def find_problems(session: NvmlSession, gpu_ram_gb: float | None, under_load: bool) -> list[str]:
    """What is wrong with an opened session's GPUs (see `GpuMonitor.check_health`)."""
    problems: list[str] = []
    for index, handle in session.handles:
        if handle is None:
            problems.append(f"GPU {index}: NVML cannot reach it ({session.unreachable[index]})")
            continue
        label = GpuDevice(index, text(session.read("nvmlDeviceGetName", handle))).label
        found = _device_problems(session, handle, under_load)
        if gpu_ram_gb is not None:
            found.extend(_memory_problems(session, handle, gpu_ram_gb))
        problems.extend(f"{label}: {problem}" for problem in found)
    return problems


def _device_problems(session: NvmlSession, handle: Any, under_load: bool) -> list[str]:
    read = session.read
    problems = []
    errors = integer(
        read("nvmlDeviceGetTotalEccErrors", handle, MEMORY_ERROR_TYPE_UNCORRECTED, VOLATILE_ECC)
    )
    if errors:
        problems.append(f"{errors} uncorrected ECC errors since the driver loaded")
    reasons = integer(session.read_first(_CLOCK_REASON_CALLS, handle)) or 0
    slowdowns = [words for bit, words in HARMFUL_CLOCK_REASONS.items() if reasons & bit]
    if slowdowns:
        problems.append(f"clocks slowed by {', '.join(slowdowns)}")
    width = integer(read("nvmlDeviceGetCurrPcieLinkWidth", handle))
    width_max = integer(read("nvmlDeviceGetMaxPcieLinkWidth", handle))
    if width and width_max and width < width_max:
        problems.append(f"PCIe link degraded to x{width} (x{width_max} possible)")
    if under_load:
        generation = integer(read("nvmlDeviceGetCurrPcieLinkGeneration", handle))
        generation_max = integer(read("nvmlDeviceGetMaxPcieLinkGeneration", handle))
        if generation and generation_max and generation < generation_max:
            problems.append(
                f"PCIe link at gen {generation} under load (gen {generation_max} possible)"
            )
    return problems


def _memory_problems(session: NvmlSession, handle: Any, gpu_ram_gb: float) -> list[str]:
    memory = session.read("nvmlDeviceGetMemoryInfo", handle)
    free = integer(getattr(memory, "free", None))
    if free is not None and free < gpu_ram_gb * GIB:
        return [f"{free / GIB:.1f} GB VRAM free, {gpu_ram_gb:g} GB required"]
    return []
