"""`/metrics` answers 200 and parses whatever the values, and its names follow Prometheus."""

from __future__ import annotations

import math
import platform
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from pyworker import __version__
from pyworker.config import WorkerConfig
from pyworker.config.environment import Environment
from pyworker.lifecycle.gpu import GpuMonitor
from pyworker.lifecycle.metrics import Exposition
from pyworker.serving.compose import Worker, compose_worker
from pyworker.serving.server import RUNNER_OPTIONS
from tests.conftest import ModelServer, wait_until
from tests.fakes.nvml import FakeGpu, FakeNvml

HUGE = 10**400  # an int no float can hold


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample, by name and labels, as prometheus_client's parser reads the text."""
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            assert isinstance(sample, Sample)
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


class Scrape:
    def __init__(self, worker: Worker, url: str, gpu: FakeGpu) -> None:
        self.worker = worker
        self.url = url
        self.gpu = gpu

    async def metrics(self) -> tuple[int, str]:
        async with aiohttp.ClientSession() as session, session.get(self.url) as response:
            return response.status, await response.text()


@pytest.fixture
async def scrape(model_server: ModelServer) -> AsyncIterator[Scrape]:
    """A local worker (details open) with one fake GPU whose readings the test sets."""
    gpu = FakeGpu(utilization_gpu=87, sm_clock_mhz=1980)
    config = WorkerConfig.model_validate(
        {"model_server": {"base_url": model_server.url}, "routes": [{"path": "/echo"}], "perf": 1}
    )
    worker = compose_worker(config, Environment.from_env({}), GpuMonitor(FakeNvml([gpu])))
    server = TestServer(worker.create_app(), host="127.0.0.1", **RUNNER_OPTIONS)
    await server.start_server()
    await wait_until(lambda: worker.status.ready)
    yield Scrape(worker, str(server.make_url("/metrics")), gpu)
    await server.close()


async def test_extreme_values_answer_200_and_parse(
    scrape: Scrape, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = scrape.worker
    figures = worker.metrics.routes["/echo"]
    figures.workload_received = math.nan
    figures.workload_served = HUGE
    figures.latency.observe(math.inf)
    figures.latency.observe(1e308)
    worker.status.max_perf = math.inf
    # The ledger can no longer hold such a load (pyworker.protocol.workload); /metrics must not
    # fail if anything ever did.
    monkeypatch.setattr(type(worker.ledger), "current_load", property(lambda _: -math.inf))
    gpu: Any = scrape.gpu  # readings no GPU gives, in types NVML does not return
    gpu.utilization_gpu = HUGE  # not a reading: left out
    gpu.sm_clock_mhz = 2**63  # the largest reading: far beyond a float's integers in hertz
    gpu.power_usage_milliwatts = 2**64 - 1
    status, text = await scrape.metrics()
    assert status == 200
    values = samples(text)
    route = (("route", "/echo"),)
    assert math.isnan(values[("pyworker_workload_received_total", route)])
    assert values[("pyworker_workload_served_total", route)] == math.inf
    assert values[("pyworker_max_perf", ())] == math.inf
    assert values[("pyworker_current_load", ())] == -math.inf
    assert values[("pyworker_request_duration_seconds_bucket", (("le", "+Inf"), *route))] == 2
    assert values[("pyworker_request_duration_seconds_sum", route)] == math.inf
    assert values[("pyworker_gpu_sm_clock_hertz", (("gpu", "0"),))] == 2**63 * 1e6
    assert values[("pyworker_gpu_power_watts", (("gpu", "0"),))] == (2**64 - 1) / 1000
    assert ("pyworker_gpu_utilization_ratio", (("gpu", "0"),)) not in values
    # The worker keeps answering: /status too, and /metrics once the values are sane again.
    status_url = scrape.url.replace("/metrics", "/status")
    async with aiohttp.ClientSession() as session, session.get(status_url) as response:
        assert response.status == 200
    figures.workload_received = 3.0
    status, text = await scrape.metrics()
    assert status == 200 and samples(text)[("pyworker_workload_received_total", route)] == 3


@given(
    value=st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(min_value=-(10**400), max_value=10**400),
    )
)
def test_any_number_is_written_so_that_prometheus_reads_it_back(value: float) -> None:
    out = Exposition()
    out.family("pyworker_test", "gauge", "A value.")
    out.sample("pyworker_test", value, route='a "quoted"\\ route\nwith a newline')
    (family,) = text_string_to_metric_families(out.text())
    (sample,) = family.samples
    assert sample.labels == {"route": 'a "quoted"\\ route\nwith a newline'}
    try:
        expected = float(value)
    except OverflowError:
        expected = math.inf if value > 0 else -math.inf
    if math.isnan(expected):
        assert math.isnan(sample.value)
    else:
        assert sample.value == expected


# Prometheus naming: https://prometheus.io/docs/practices/naming/
NAME = re.compile(r"^pyworker_[a-z0-9]+(_[a-z0-9]+)*$")
NOT_BASE_UNITS = re.compile(
    r"_(percent|mhz|khz|ghz|ms|milliseconds|us|minutes|hours|kb|mb|gb|kib|mib|gib|milliwatts)(_|$)"
)


async def test_names_follow_the_prometheus_conventions(scrape: Scrape) -> None:
    status, text = await scrape.metrics()
    assert status == 200
    families = list(text_string_to_metric_families(text))
    names = {family.name for family in families}
    for family in families:
        assert NAME.match(family.name), family.name
        assert not NOT_BASE_UNITS.search(family.name), f"{family.name}: use a base unit"
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), family.name
    assert {
        "pyworker_gpu_utilization_ratio",
        "pyworker_gpu_sm_clock_hertz",
        "pyworker_gpu_memory_used_bytes",
        "pyworker_request_duration_seconds",
    } <= names
    values = samples(text)
    assert values[("pyworker_gpu_utilization_ratio", (("gpu", "0"),))] == 0.87
    assert values[("pyworker_gpu_sm_clock_hertz", (("gpu", "0"),))] == 1.98e9
    build = (("python", platform.python_version()), ("version", __version__))
    assert values[("pyworker_build_info", build)] == 1
