"""`GpuMonitor`: what the worker asks of its GPUs, on or off the event loop.

NVML calls are blocking C calls. On the event loop use the `a*` methods (`aopen`, `ainventory`,
`acheck_health`, `asample`), which run them in a thread; the sampler has its own thread.
"""

from __future__ import annotations

import asyncio

from pyworker.lifecycle.gpu.health import find_problems
from pyworker.lifecycle.gpu.inventory import GpuInventory, read_inventory
from pyworker.lifecycle.gpu.nvml import NvmlSession
from pyworker.lifecycle.gpu.sampling import GpuSample, GpuSampler, read_samples


class GpuMonitor(NvmlSession):
    """Inventory, health checks and single readings of every GPU.

    Every method opens NVML on first use and answers as if there were no GPU without it; all
    are safe to call from several threads.
    """

    def __enter__(self) -> GpuMonitor:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def inventory(self) -> GpuInventory:
        return read_inventory(self) if self.open() else GpuInventory()

    def check_health(
        self, gpu_ram_gb: float | None = None, *, under_load: bool = False
    ) -> list[str]:
        """What is wrong with the GPUs, one sentence per problem; empty when all is well.

        `gpu_ram_gb` is the free memory each GPU must have (so check before the model loads).
        PCIe: a link narrower than its maximum width is always a problem; a generation below the
        maximum is one only when `under_load`, since idle GPUs lower their link speed to save power.
        """
        return find_problems(self, gpu_ram_gb, under_load) if self.open() else []

    def sample(self) -> tuple[GpuSample, ...]:
        """One reading of every reachable GPU."""
        return read_samples(self) if self.open() else ()

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
