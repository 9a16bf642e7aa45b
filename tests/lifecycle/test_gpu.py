"""GPU inventory, health and sampling against a fake NVML, and the real pynvml without a GPU."""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import sys
import threading
import time
from collections.abc import Callable

import pytest

from pyworker.lifecycle.gpu import GIB, GpuMonitor, GpuSampleSummary, NvmlState
from tests.fakes.nvml import (
    NVML_ERROR_DRIVER_NOT_LOADED,
    FakeGpu,
    FakeNvml,
    nvmlClocksEventReasonApplicationsClocksSetting,
    nvmlClocksEventReasonGpuIdle,
    nvmlClocksEventReasonHwPowerBrakeSlowdown,
    nvmlClocksEventReasonHwThermalSlowdown,
    nvmlClocksEventReasonSwPowerCap,
)

TIMEOUT = 5.0


def wait_until(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("condition not met before the deadline")
        time.sleep(0.002)


def two_gpus() -> FakeNvml:
    return FakeNvml(
        [
            FakeGpu(),
            FakeGpu(
                name="NVIDIA A100-SXM4-40GB",
                uuid="GPU-second",
                memory_total=40 * GIB,
                memory_free=39 * GIB,
                pcie_generation=4,
                pcie_generation_max=4,
                power_limit_milliwatts=400_000,
            ),
        ]
    )


def test_inventory_of_two_gpus() -> None:
    nvml = two_gpus()
    with GpuMonitor(nvml) as monitor:
        inventory = monitor.inventory()
    assert inventory.count == 2
    assert inventory.driver_version == "550.54.15"
    assert inventory.cuda_version == "12.4"
    first, second = inventory.devices
    assert (first.index, first.name, first.uuid) == (0, "NVIDIA H100 80GB HBM3", FakeGpu().uuid)
    assert (first.memory_total_bytes, first.memory_free_bytes) == (80 * GIB, 79 * GIB)
    assert (first.pcie_generation, first.pcie_generation_max) == (5, 5)
    assert (first.pcie_width, first.pcie_width_max) == (16, 16)
    assert first.power_limit_watts == 700.0
    assert (second.index, second.name, second.power_limit_watts) == (
        1,
        "NVIDIA A100-SXM4-40GB",
        400,
    )
    assert second.pcie_generation_max == 4
    decoded = json.loads(json.dumps(inventory.to_dict()))
    assert decoded["devices"][1]["uuid"] == "GPU-second"
    assert inventory.fingerprint() == two_gpus_inventory_fingerprint()
    assert nvml.shutdown_calls == 1


def two_gpus_inventory_fingerprint() -> str:
    return f"2x[NVIDIA H100 80GB HBM3/{80 * GIB},NVIDIA A100-SXM4-40GB/{40 * GIB}] driver=550.54.15"


def test_healthy_gpus_have_no_problems() -> None:
    monitor = GpuMonitor(two_gpus())
    assert monitor.check_health(gpu_ram_gb=30, under_load=True) == []


def assert_no_gpu(monitor: GpuMonitor) -> None:
    assert monitor.open() is False
    assert monitor.state is NvmlState.UNAVAILABLE
    assert monitor.inventory().count == 0
    assert monitor.inventory().to_dict() == {
        "devices": (),
        "driver_version": None,
        "cuda_version": None,
    }
    assert monitor.check_health(gpu_ram_gb=40, under_load=True) == []
    assert monitor.sample() == ()
    sampler = monitor.sampler(interval=0.01)
    sampler.start()
    assert not sampler.running
    summary = sampler.stop()
    assert (summary.sample_count, summary.gpus) == (0, ())
    assert summary.perf_per_gpu(10.0) is None
    assert sampler.last_sample() == ()


def no_gpu_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "pyworker.lifecycle.gpu"]


def test_without_pynvml_there_is_no_gpu(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    caplog.set_level(logging.DEBUG, logger="pyworker.lifecycle.gpu")
    assert_no_gpu(GpuMonitor())
    records = no_gpu_records(caplog)
    assert [record.levelno for record in records] == [logging.INFO]
    assert "no GPU: pynvml cannot be imported" in records[0].getMessage()


def test_when_nvml_does_not_start_there_is_no_gpu(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="pyworker.lifecycle.gpu")
    nvml = FakeNvml(init_error=NVML_ERROR_DRIVER_NOT_LOADED)
    assert_no_gpu(GpuMonitor(nvml))
    assert nvml.init_calls == 1
    records = no_gpu_records(caplog)
    assert [record.getMessage() for record in records] == [
        "no GPU: NVML did not start (Driver Not Loaded)"
    ]


def nvml_library_present() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


@pytest.mark.skipif(nvml_library_present(), reason="this machine has an NVIDIA driver")
def test_real_pynvml_on_a_machine_without_gpu(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pyworker.lifecycle.gpu")
    assert_no_gpu(GpuMonitor())
    assert "NVML did not start" in no_gpu_records(caplog)[0].getMessage()


@pytest.mark.skipif(not nvml_library_present(), reason="no NVIDIA driver on this machine")
def test_real_pynvml_on_a_gpu_machine() -> None:
    with GpuMonitor() as monitor:
        inventory = monitor.inventory()
        assert inventory.count >= 1
        assert all(device.name and device.memory_total_bytes for device in inventory.devices)
        assert isinstance(monitor.check_health(gpu_ram_gb=1), list)
        sampler = monitor.sampler(interval=0.01)
        sampler.start()
        wait_until(lambda: sampler.samples_taken >= 3)
        summary = sampler.stop()
    assert len(summary.gpus) == inventory.count
    assert summary.gpus[0].temperature_celsius.peak is not None


def test_harmful_throttling_is_a_problem_and_idle_is_not() -> None:
    nvml = two_gpus()
    nvml.gpus[0].clock_event_reasons = (
        nvmlClocksEventReasonHwThermalSlowdown
        | nvmlClocksEventReasonHwPowerBrakeSlowdown
        | nvmlClocksEventReasonSwPowerCap
    )
    nvml.gpus[1].clock_event_reasons = (
        nvmlClocksEventReasonGpuIdle | nvmlClocksEventReasonApplicationsClocksSetting
    )
    assert GpuMonitor(nvml).check_health() == [
        "GPU 0 (NVIDIA H100 80GB HBM3): clocks slowed by hardware thermal slowdown, "
        "hardware power brake"
    ]


def test_throttle_reasons_through_the_pre_12_2_name() -> None:
    nvml = FakeNvml(missing=["nvmlDeviceGetCurrentClocksEventReasons"])
    nvml.gpus[0].clock_event_reasons = nvmlClocksEventReasonHwThermalSlowdown
    problems = GpuMonitor(nvml).check_health()
    assert problems == ["GPU 0 (NVIDIA H100 80GB HBM3): clocks slowed by hardware thermal slowdown"]


def test_vram_shortfall_names_free_and_required() -> None:
    nvml = two_gpus()
    nvml.gpus[0].memory_free = int(3.2 * GIB)
    monitor = GpuMonitor(nvml)
    assert monitor.check_health(gpu_ram_gb=40) == [
        "GPU 0 (NVIDIA H100 80GB HBM3): 3.2 GB VRAM free, 40 GB required",
        "GPU 1 (NVIDIA A100-SXM4-40GB): 39.0 GB VRAM free, 40 GB required",
    ]
    assert monitor.check_health(gpu_ram_gb=3) == []


def test_uncorrected_ecc_errors() -> None:
    nvml = two_gpus()
    nvml.gpus[1].ecc_uncorrected_volatile = 2
    assert GpuMonitor(nvml).check_health() == [
        "GPU 1 (NVIDIA A100-SXM4-40GB): 2 uncorrected ECC errors since the driver loaded"
    ]


def test_degraded_pcie_width_always_and_generation_only_under_load() -> None:
    nvml = two_gpus()
    nvml.gpus[0].pcie_width = 8
    nvml.gpus[1].pcie_generation = 1  # idle GPUs lower their link speed
    monitor = GpuMonitor(nvml)
    width_problem = "GPU 0 (NVIDIA H100 80GB HBM3): PCIe link degraded to x8 (x16 possible)"
    assert monitor.check_health() == [width_problem]
    assert monitor.check_health(under_load=True) == [
        width_problem,
        "GPU 1 (NVIDIA A100-SXM4-40GB): PCIe link at gen 1 under load (gen 4 possible)",
    ]


def test_unsupported_fields_read_as_none() -> None:
    nvml = two_gpus()
    nvml.gpus[0].unsupported = {
        "nvmlDeviceGetUUID",
        "nvmlDeviceGetPowerManagementLimit",
        "nvmlDeviceGetTotalEccErrors",
        "nvmlDeviceGetCurrentClocksEventReasons",
        "nvmlDeviceGetCurrentClocksThrottleReasons",
        "nvmlDeviceGetCurrPcieLinkWidth",
        "nvmlDeviceGetPowerUsage",
        "nvmlDeviceGetTemperature",
    }
    nvml.gpus[0].ecc_uncorrected_volatile = 5  # not readable, so not reported
    monitor = GpuMonitor(nvml)
    first = monitor.inventory().devices[0]
    assert (first.uuid, first.power_limit_watts, first.pcie_width) == (None, None, None)
    assert (first.name, first.pcie_width_max, first.memory_free_bytes) == (
        "NVIDIA H100 80GB HBM3",
        16,
        79 * GIB,
    )
    assert monitor.inventory().devices[1].uuid == "GPU-second"
    assert monitor.check_health(gpu_ram_gb=1, under_load=True) == []
    sample = monitor.sample()[0]
    assert (sample.power_watts, sample.temperature_celsius) == (None, None)
    assert sample.sm_clock_mhz == 1980


def test_unreachable_gpu_is_listed_and_reported() -> None:
    nvml = two_gpus()
    nvml.gpus[1].lost = True
    monitor = GpuMonitor(nvml)
    inventory = monitor.inventory()
    assert [device.name for device in inventory.devices] == ["NVIDIA H100 80GB HBM3", None]
    assert monitor.check_health() == ["GPU 1: NVML cannot reach it (GPU is lost)"]
    assert [sample.index for sample in monitor.sample()] == [0]


def test_sampler_keeps_peak_and_mean_on_its_own_thread() -> None:
    nvml = two_gpus()
    monitor = GpuMonitor(nvml)
    monitor.open()
    nvml.caller_threads.clear()
    sampler = monitor.sampler(interval=0.002)
    for gpu in nvml.gpus:
        gpu.power_usage_milliwatts = 100_000
        gpu.utilization_gpu = 10
    sampler.start()
    assert sampler.running
    wait_until(lambda: sampler.samples_taken >= 3)
    nvml.gpus[0].power_usage_milliwatts = 300_000
    nvml.gpus[0].utilization_gpu = 90
    count = sampler.samples_taken
    wait_until(lambda: sampler.samples_taken >= count + 3)
    latest = sampler.last_sample()
    summary = sampler.stop()
    assert not sampler.running
    assert threading.get_ident() not in nvml.caller_threads
    assert len(nvml.caller_threads) == 1
    assert [sample.index for sample in latest] == [0, 1]
    assert latest[0].power_watts == 300.0

    first, second = summary.gpus
    assert first.power_watts.peak == 300.0
    assert first.power_watts.mean is not None and 100.0 < first.power_watts.mean < 300.0
    assert first.utilization_percent.peak == 90
    assert (second.power_watts.peak, second.power_watts.mean) == (100.0, 100.0)
    assert second.memory_used_bytes.peak == 1 * GIB
    assert second.temperature_celsius.mean == 35
    assert second.sm_clock_mhz.peak == 1980
    assert summary.sample_count == first.power_watts.count >= 6
    assert summary.duration_seconds > 0
    json.dumps(summary.to_dict())


def test_perf_per_gpu_and_per_watt() -> None:
    nvml = two_gpus()
    for gpu in nvml.gpus:
        gpu.power_usage_milliwatts = 250_000
    monitor = GpuMonitor(nvml)
    sampler = monitor.sampler(interval=0.002)
    sampler.start()
    wait_until(lambda: sampler.samples_taken >= 2)
    summary = sampler.stop()
    assert summary.perf_per_gpu(100.0) == 50.0
    assert summary.perf_per_watt(100.0) == pytest.approx(0.2)
    assert GpuSampleSummary().perf_per_watt(100.0) is None


def test_sampler_can_run_again_and_refuses_to_run_twice() -> None:
    monitor = GpuMonitor(FakeNvml())
    sampler = monitor.sampler(interval=0.002)
    sampler.start()
    with pytest.raises(RuntimeError, match="already running"):
        sampler.start()
    wait_until(lambda: sampler.samples_taken >= 2)
    sampler.stop()
    sampler.start()
    wait_until(lambda: sampler.samples_taken >= 1)
    assert sampler.stop().sample_count == sampler.samples_taken


async def test_async_wrappers_run_off_the_event_loop() -> None:
    nvml = two_gpus()
    monitor = GpuMonitor(nvml)
    assert await monitor.aopen()
    inventory = await monitor.ainventory()
    problems = await monitor.acheck_health(gpu_ram_gb=100)
    samples = await monitor.asample()
    sampler = monitor.sampler(interval=0.002)
    sampler.start()
    await asyncio.to_thread(wait_until, lambda: sampler.samples_taken >= 2)
    summary = await sampler.astop()
    await monitor.aclose()
    assert inventory.count == 2 and len(samples) == 2 and len(problems) == 2
    assert len(summary.gpus) == 2
    assert threading.get_ident() not in nvml.caller_threads
    assert nvml.shutdown_calls == 1
    assert monitor.inventory().count == 0  # a closed monitor answers as if there were no GPU
