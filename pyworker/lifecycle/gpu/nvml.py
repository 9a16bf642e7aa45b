"""The NVML session: starting and stopping NVML, and reading one value without ever failing.

A field a device does not support (NVML's NotSupported and friends), or a call an older NVML
lacks, reads as None; the readers above turn the raw values into typed ones with `text`,
`integer` and `milliwatts_to_watts`.
"""

from __future__ import annotations

import importlib
import logging
import threading
from types import ModuleType
from typing import Any

from pyworker.backports import StrEnum

logger = logging.getLogger(__package__)
"""One logger for the GPU subsystem: its lines read `pyworker.lifecycle.gpu` whatever module."""

GIB = 1024**3

# Constants of nvml.h, fixed by its C ABI; not read from the module so that fakes stay small.
TEMPERATURE_GPU = 0
CLOCK_SM = 1
MEMORY_ERROR_TYPE_UNCORRECTED = 1
VOLATILE_ECC = 0


def text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value if isinstance(value, str) else None


def integer(value: Any) -> int | None:
    """An NVML reading, or None for anything else: a reading is a 64-bit integer at most."""
    if isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**64:
        return value
    return None


def milliwatts_to_watts(value: Any) -> float | None:
    milliwatts = integer(value)
    return None if milliwatts is None else milliwatts / 1000


class NvmlState(StrEnum):
    NEW = "new"  # not opened yet
    AVAILABLE = "available"
    UNAVAILABLE = "unavailable"  # no NVML: the machine has no usable GPU
    CLOSED = "closed"  # final: a closed monitor answers like one without a GPU


class NvmlSession:
    """Owns NVML: `open()` starts it once and finds the GPUs, `read()` calls it safely.

    `nvml` is the module to use (tests pass a fake); by default `pynvml` is imported on `open()`.
    Opening and closing are safe to call from several threads.
    """

    def __init__(self, nvml: ModuleType | None = None) -> None:
        self._given = nvml
        self._nvml: Any = None
        self.handles: list[tuple[int, Any]] = []
        """(index, handle) of every GPU; the handle is None for a GPU NVML cannot reach."""
        self.unreachable: dict[int, str] = {}
        """Why NVML cannot reach a GPU, by index."""
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
            self.handles = []
            self.unreachable = {}

    def read(self, name: str, *args: Any) -> Any:
        """Call NVML function `name`; None if this module or device does not have it."""
        function = getattr(self._nvml, name, None)
        if function is None:
            return None
        try:
            return function(*args)
        except self._nvml.NVMLError as error:
            logger.debug("%s: %s", name, error)
            return None

    def read_first(self, names: tuple[str, ...], *args: Any) -> Any:
        """The first of `names` that answers: a newer NVML call, then the one it replaced."""
        for name in names:
            value = self.read(name, *args)
            if value is not None:
                return value
        return None

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
        count = integer(self.read("nvmlDeviceGetCount")) or 0
        for index in range(count):
            try:
                self.handles.append((index, nvml.nvmlDeviceGetHandleByIndex(index)))
            except nvml.NVMLError as error:
                logger.warning("GPU %d cannot be reached through NVML: %s", index, error)
                self.handles.append((index, None))
                self.unreachable[index] = str(error)
        logger.info("NVML started: %d GPU(s)", count)

    def _set_unavailable(self, reason: str) -> None:
        self._state = NvmlState.UNAVAILABLE  # final, so this is logged once
        logger.info("no GPU: %s", reason)
