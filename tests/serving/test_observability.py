"""The worker's own routes: /health, /ready, /status and /metrics."""

from __future__ import annotations

import re
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from pyworker.config import WorkerConfig
from pyworker.config.environment import Environment
from pyworker.lifecycle.gpu import GpuMonitor
from pyworker.serving.compose import compose_worker
from pyworker.serving.server import RUNNER_OPTIONS
from tests.conftest import KeyPair, ModelServer, WorkerFactory, wait_until
from tests.fakes.nvml import FakeGpu, FakeNvml


def _sample(text: str, name: str, **labels: str) -> float:
    rendered = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = "^" + re.escape(f"{name}{{{rendered}}}" if labels else name) + r" (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"{name} {labels} not in metrics"
    return float(match.group(1))


async def test_ready_is_503_while_loading_then_200(
    start_worker: WorkerFactory, model_server: ModelServer
) -> None:
    model_server.recorder.healthy = False
    running = await start_worker(
        model_server={"base_url": model_server.url, "health_path": "/health"}, wait_ready=False
    )
    async with running.session.get(running.url + "/ready") as response:
        assert response.status == 503
        assert (await response.json())["ready"] is False
    async with running.session.get(running.url + "/health") as response:
        assert response.status == 200  # alive, though not ready
    model_server.recorder.healthy = True
    await wait_until(lambda: running.worker.status.ready)
    async with running.session.get(running.url + "/ready") as response:
        assert response.status == 200
        assert await response.json() == {"ready": True, "state": "ready", "error": ""}


async def test_metrics_count_requests_by_route_and_outcome(
    start_worker: WorkerFactory, keypair: KeyPair
) -> None:
    running = await start_worker()
    body: dict[str, Any] = {"auth_data": keypair.auth_data(cost=4), "payload": {}}
    for status in (200, 200, 500):
        body["payload"] = {"status": status}
        async with running.post("/echo", body) as response:
            await response.read()
    async with running.session.get(running.url + "/metrics") as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await response.text()
    assert _sample(text, "pyworker_requests_total", route="/echo", outcome="Success") == 2
    assert _sample(text, "pyworker_requests_total", route="/echo", outcome="Error") == 1
    assert _sample(text, "pyworker_request_duration_seconds_count", route="/echo") == 3
    assert _sample(text, "pyworker_request_duration_seconds_bucket", route="/echo", le="+Inf") == 3
    assert _sample(text, "pyworker_workload_received_total", route="/echo") == 3
    assert _sample(text, "pyworker_workload_served_total", route="/echo") == 2
    assert _sample(text, "pyworker_state", state="ready") == 1
    assert _sample(text, "pyworker_state", state="loading") == 0
    assert _sample(text, "pyworker_max_perf") == 1000
    assert _sample(text, "pyworker_in_flight") == 0
    assert _sample(text, "pyworker_queue_depth", route="/slow") == 0
    assert "pyworker_gpu_" not in text  # no NVML here

    async with running.session.get(running.url + "/status") as response:
        status = await response.json()
    assert status["routes"]["/echo"]["outcomes"]["Success"] == 2
    assert status["requests"]["totals"]["Error"] == 1
    assert status["max_perf"] == 1000 and status["public_key_loaded"] is True


async def test_gpu_gauges_and_inventory_from_nvml(model_server: ModelServer) -> None:
    fake = FakeNvml([FakeGpu(utilization_gpu=87, temperature=61)])
    config = WorkerConfig.model_validate(
        {"model_server": {"base_url": model_server.url}, "routes": [{"path": "/echo"}], "perf": 1}
    )
    worker = compose_worker(config, Environment.from_env({}), GpuMonitor(fake))
    server = TestServer(worker.create_app(), host="127.0.0.1", **RUNNER_OPTIONS)
    await server.start_server()
    try:
        await wait_until(lambda: worker.status.ready)
        client = server.make_url
        async with aiohttp.ClientSession() as session:
            async with session.get(str(client("/metrics"))) as response:
                text = await response.text()
            async with session.get(str(client("/status"))) as response:
                status = await response.json()
    finally:
        await server.close()
    assert _sample(text, "pyworker_gpu_utilization_ratio", gpu="0") == 0.87
    assert _sample(text, "pyworker_gpu_temperature_celsius", gpu="0") == 61
    (device,) = status["gpu"]["inventory"]["devices"]
    assert device["name"] == "NVIDIA H100 80GB HBM3"
    assert status["gpu"]["last_samples"][0]["utilization_percent"] == 87
