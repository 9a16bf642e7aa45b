"""What GPUs the machine has: models, memory, PCIe links, power limit, driver and CUDA versions.

The inventory is read once at start-up; its fingerprint keys the benchmark cache.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pyworker.lifecycle.gpu.nvml import NvmlSession, integer, milliwatts_to_watts, text

_CUDA_VERSION_CALLS = ("nvmlSystemGetCudaDriverVersion_v2", "nvmlSystemGetCudaDriverVersion")


@dataclass(frozen=True, slots=True)
class GpuDevice:
    """One GPU as found at start-up; a field is None where the device or driver cannot tell."""

    index: int
    name: str | None = None
    uuid: str | None = None
    memory_total_bytes: int | None = None
    memory_free_bytes: int | None = None
    """Free when the worker started, before the model server loaded its model."""
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


def read_inventory(session: NvmlSession) -> GpuInventory:
    """The inventory of an opened session's GPUs."""
    return GpuInventory(
        devices=tuple(_device(session, index, handle) for index, handle in session.handles),
        driver_version=text(session.read("nvmlSystemGetDriverVersion")),
        cuda_version=_cuda_version(session.read_first(_CUDA_VERSION_CALLS)),
    )


def _cuda_version(value: Any) -> str | None:
    """NVML encodes CUDA 12.4 as 12040."""
    number = integer(value)
    return None if number is None else f"{number // 1000}.{number % 1000 // 10}"


def _device(session: NvmlSession, index: int, handle: Any) -> GpuDevice:
    if handle is None:
        return GpuDevice(index)
    read = session.read
    memory = read("nvmlDeviceGetMemoryInfo", handle)
    return GpuDevice(
        index=index,
        name=text(read("nvmlDeviceGetName", handle)),
        uuid=text(read("nvmlDeviceGetUUID", handle)),
        memory_total_bytes=integer(getattr(memory, "total", None)),
        memory_free_bytes=integer(getattr(memory, "free", None)),
        pcie_generation=integer(read("nvmlDeviceGetCurrPcieLinkGeneration", handle)),
        pcie_generation_max=integer(read("nvmlDeviceGetMaxPcieLinkGeneration", handle)),
        pcie_width=integer(read("nvmlDeviceGetCurrPcieLinkWidth", handle)),
        pcie_width_max=integer(read("nvmlDeviceGetMaxPcieLinkWidth", handle)),
        power_limit_watts=milliwatts_to_watts(read("nvmlDeviceGetPowerManagementLimit", handle)),
    )
