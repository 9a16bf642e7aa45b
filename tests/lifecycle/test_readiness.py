"""Readiness end to end: a vLLM-like model server, `pyworker run`, a recording autoscaler."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pyworker.config import WorkerConfig
from pyworker.config.environment import Environment
from pyworker.lifecycle.gpu import GpuMonitor
from pyworker.lifecycle.state import WorkerState
from pyworker.serving.compose import Worker, compose_worker
from tests.conftest import KeyPair, wait_until
from tests.fakes import nvml
from tests.fakes.nvml import FakeGpu, FakeNvml
from tests.support.fake_autoscaler import FakeAutoscaler
from tests.support.logging_model_server import LOADED_LINE
from tests.support.processes import spawn, stop

CONFIG = """
name = "vllm-like"
[model_server]
base_url = "{url}"
log_file = "{log}"
health_path = "/health"
model_id = "tiny"
load_patterns = ["Application startup complete."]
error_patterns = ["CUDA out of memory", {{ text = "^Traceback", regex = true }}]
[[routes]]
path = "/v1/completions"
workload = "max_tokens"
[benchmark]
dataset = [{{ max_tokens = 8 }}]
rounds = 2
concurrency = 4
"""
REPOSITORY = Path(__file__).resolve().parents[2]


class Scene:
    def __init__(self, tmp_path: Path, autoscaler: FakeAutoscaler) -> None:
        self.tmp_path = tmp_path
        self.autoscaler = autoscaler
        self.log = tmp_path / "model.log"
        self.model_url = ""
        self.session = aiohttp.ClientSession(headers={"Authorization": "Bearer token"})

    def env(self) -> dict[str, str]:
        environ = dict(os.environ)
        environ.update(
            REPORT_ADDR=self.autoscaler.url,
            CONTAINER_ID="5",
            MASTER_TOKEN="token",
            UNSECURED="false",
            PYWORKER_CACHE_DIR=str(self.tmp_path / "cache"),
            PYTHONPATH=str(REPOSITORY),
            WORKER_HOST="127.0.0.1",
        )
        return environ

    async def start_worker(self, *overrides: str) -> tuple[asyncio.subprocess.Process, str]:
        config = self.tmp_path / "worker.toml"
        config.write_text(CONFIG.format(url=self.model_url, log=self.log))
        arguments = ["-m", "pyworker", "run", str(config), "--port", "0"]
        for override in overrides:
            arguments += ["--set", override]
        return await spawn(*arguments, env=self.env())

    async def model_log(self, line: str) -> None:
        async with self.session.post(self.model_url + "/control/log", json={"line": line}) as r:
            assert r.status == 200

    async def completions_served(self) -> int:
        async with self.session.get(self.model_url + "/control/stats") as response:
            count: int = (await response.json())["completions"]
            return count

    async def wait_ready(self, url: str) -> float:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            async with self.session.get(url + "/ready") as response:
                if response.status == 200:
                    return time.monotonic()
            await asyncio.sleep(0.01)
        raise AssertionError("worker never became ready")

    def mark(self) -> int:
        return len(self.autoscaler.worker_status)

    async def wait_report(
        self, predicate: Any, after: int = 0, timeout: float = 10.0
    ) -> dict[str, Any]:
        """The first report, sent after the `after`-th, that `predicate` accepts."""
        return await self.autoscaler.wait_report(predicate, after, timeout)


@pytest.fixture
async def scene(tmp_path: Path, keypair: KeyPair) -> AsyncIterator[Scene]:
    async with FakeAutoscaler(keypair.pem) as autoscaler:
        scene = Scene(tmp_path, autoscaler)
        model, scene.model_url = await spawn(
            "-m", "tests.support.logging_model_server", "--log", str(scene.log),
            "--load-after", "1.5", env=scene.env(),
        )  # fmt: skip
        try:
            yield scene
        finally:
            await scene.session.close()
            await stop(model)


async def test_loading_ready_error_recovery_and_benchmark_cache(scene: Scene) -> None:
    worker, url = await scene.start_worker()
    try:
        loading = await scene.wait_report(lambda r: r["error_msg"] == "")
        assert loading["loadtime"] == 0.0 and loading["max_perf"] == 0.0 and loading["id"] == 5

        ready_at = await scene.wait_ready(url)
        ready = await scene.wait_report(lambda r: r["max_perf"] > 0, timeout=1.0)
        assert all(r["max_perf"] == 0 for r in scene.autoscaler.worker_status[:1])
        assert time.monotonic() - ready_at < 1.0
        assert ready["loadtime"] > 0
        assert ready["url"] == url
        benchmarked = await scene.completions_served()
        assert benchmarked > 1  # the first answer, then the ramp
        async with scene.session.get(url + "/status") as response:
            measured = (await response.json())["benchmark"]
        # The ramp's curve: 1, 2, 4 in flight at most (the config's ceiling), and its choice.
        curve = measured["curve"]
        assert [step["concurrency"] for step in curve] == [1, 2, 4][: len(curve)]
        assert all(step["perf"] > 0 and 0 < step["p50"] <= step["p90"] for step in curve)
        # The best step is measured again: that figure is max_perf.
        best = max(curve, key=lambda step: step["perf"])
        assert measured["concurrency"] == best["concurrency"] and measured["stopped"]
        again = measured["confirmed"]
        assert again["concurrency"] == best["concurrency"] and again["windows"] >= 1
        assert measured["perf"] == ready["max_perf"] == again["perf"] > 0
        assert measured["ceiling"] == "4 (configured)" and not measured["cached"]

        # The log is rotated; the model then fails, in the new file.
        scene.log.rename(scene.log.with_suffix(".old"))
        mark = scene.mark()
        await scene.model_log("torch.OutOfMemoryError: CUDA out of memory. Tried 2.00 GiB")
        errored = await scene.wait_report(lambda r: "CUDA out of memory" in r["error_msg"], mark)
        assert errored["max_perf"] == 0.0
        async with scene.session.get(url + "/ready") as response:
            assert response.status == 503
            assert (await response.json())["state"] == "errored"

        # Truncated in place, then the model server is back: the error clears.
        os.truncate(scene.log, 0)
        mark = scene.mark()
        await scene.model_log(LOADED_LINE)
        await scene.wait_report(lambda r: r["error_msg"] == "" and r["max_perf"] > 0, mark)
        assert await scene.completions_served() == benchmarked  # cache hit
        async with scene.session.get(url + "/status") as response:
            status = await response.json()
        assert status["log"]["rotations"] >= 1 and status["log"]["truncations"] >= 1
        assert status["benchmark"]["cached"] and status["benchmark"]["curve"] == curve
    finally:
        assert await stop(worker) == 0

    # A cold restart on the same GPU and model skips the benchmark ...
    worker, url = await scene.start_worker()
    try:
        await scene.wait_ready(url)
        assert await scene.completions_served() == benchmarked
    finally:
        assert await stop(worker) == 0
    # ... another model runs it again.
    worker, url = await scene.start_worker("model_server.model_id=another")
    try:
        await scene.wait_ready(url)
        assert await scene.completions_served() > benchmarked
    finally:
        assert await stop(worker) == 0
    marker = await asyncio.to_thread(Path(".has_benchmark").read_text)
    assert float(marker) > 0  # the reference's marker, in the worker's working folder


# --- in process, with a fake NVML --------------------------------------------------------
def _worker(nvml: FakeNvml, **config: Any) -> Worker:
    raw: dict[str, Any] = {"routes": [{"path": "/x"}], "perf": 5.0, **config}
    return compose_worker(
        WorkerConfig.model_validate(raw), Environment.from_env({}), GpuMonitor(nvml)
    )


async def test_vram_shortfall_is_an_error_that_says_so() -> None:
    gib = 2**30
    fake = FakeNvml([FakeGpu(name="NVIDIA H100", memory_total=80 * gib, memory_free=3 * gib)])
    worker = _worker(fake, gpu_ram=40)
    await worker.readiness.run()
    assert worker.status.state is WorkerState.ERRORED
    assert worker.status.error_msg == "GPU 0 (NVIDIA H100): 3.0 GB VRAM free, 40 GB required"
    assert worker.readiness.inventory.count == 1


async def test_throttling_is_an_error() -> None:
    slowed = FakeGpu(clock_event_reasons=nvml.nvmlClocksEventReasonHwSlowdown)
    worker = _worker(FakeNvml([FakeGpu(), slowed]))
    await worker.readiness.run()
    assert worker.status.state is WorkerState.ERRORED
    assert "GPU 1" in worker.status.error_msg
    assert "slowdown" in worker.status.error_msg.lower()


async def test_healthy_gpus_are_listed_in_status(start_worker: Any) -> None:
    running = await start_worker()
    worker: Worker = running.worker
    async with running.session.get(running.url + "/status") as response:
        status = await response.json()
    assert status["state"] == "ready" and status["gpu"]["inventory"]["devices"] == []
    assert worker.readiness.inventory.count == 0
    await wait_until(lambda: worker.status.ready)


async def test_non_fatal_error_lines_are_only_counted(
    start_worker: Any, model_server: Any, tmp_path: Path
) -> None:
    log = tmp_path / "model.log"
    log.write_text("starting\nmodel loaded\n")
    running = await start_worker(
        model_server={
            "base_url": model_server.url,
            "log_file": str(log),
            "load_patterns": ["model loaded"],
            "error_patterns": [{"text": "WARNING.*slow", "regex": True, "fatal": False}, "FATAL"],
        }
    )
    worker: Worker = running.worker
    with log.open("a") as file:
        file.write("WARNING: request was slow\n")
    await wait_until(lambda: worker.readiness.error_lines == 1)
    assert worker.status.state is WorkerState.READY and worker.status.error_msg == ""
    with log.open("a") as file:
        file.write("FATAL: engine died\n")
    await wait_until(lambda: worker.status.state is WorkerState.ERRORED)
    assert worker.status.error_msg == "model server error: FATAL: engine died"


async def test_health_only_worker_errors_and_recovers_with_its_health(
    start_worker: Any, model_server: Any
) -> None:
    running = await start_worker(
        model_server={
            "base_url": model_server.url,
            "health_path": "/health",
            "health_interval": 0.05,
            "health_failures": 2,
        }
    )
    worker: Worker = running.worker
    model_server.recorder.healthy = False
    await wait_until(lambda: worker.status.state is WorkerState.ERRORED)
    assert "health check /health failing" in worker.status.error_msg
    model_server.recorder.healthy = True
    await wait_until(lambda: worker.status.ready)
    assert worker.status.error_msg == ""
