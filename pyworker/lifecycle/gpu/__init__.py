"""The machine's GPUs through NVML: what they are, whether they are fit to serve, how busy they get.

- `nvml`: the NVML session (start, stop, read one value safely);
- `inventory`: the GPUs found at start-up (`GpuInventory`);
- `health`: the problems that make a GPU unfit to serve;
- `sampling`: readings and the background sampler (`GpuSampler`, `GpuSampleSummary`);
- `monitor`: `GpuMonitor`, the one object the worker holds, with the `a*` methods for asyncio.

Everything degrades to "no GPU" when NVML is missing (no `pynvml`, no driver, a CPU machine):
an empty inventory, no problems, a sampler that samples nothing, and one INFO log line. A field
a device does not support reads as None on its own; it never spoils the rest of the inventory.

Units: bytes for memory, watts, degrees Celsius, MHz, percent.
"""

from pyworker.lifecycle.gpu.inventory import GpuDevice, GpuInventory
from pyworker.lifecycle.gpu.monitor import GpuMonitor
from pyworker.lifecycle.gpu.nvml import GIB, NvmlState
from pyworker.lifecycle.gpu.sampling import GpuMetrics, GpuSample, GpuSampler, GpuSampleSummary

__all__ = [
    "GIB",
    "GpuDevice",
    "GpuInventory",
    "GpuMetrics",
    "GpuMonitor",
    "GpuSample",
    "GpuSampleSummary",
    "GpuSampler",
    "NvmlState",
]
