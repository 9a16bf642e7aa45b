"""The load deadline: a model that never loads makes the worker ERRORED, reported at once.

End to end: a model server process that loads only when told to, `pyworker run` in its own
process, a recording autoscaler. A first start waits `PYWORKER_LOAD_TIMEOUT`; a restart where
the benchmark cache already holds this model's result waits `PYWORKER_RELOAD_TIMEOUT`; either
way a model that loads later still makes the worker ready.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pyworker.config import WorkerConfig
from pyworker.config.environment import Environment, InvalidEnvironment
from pyworker.config.load_deadline import LoadDeadline, never_loaded_message
from pyworker.lifecycle.gpu import GpuMonitor
from pyworker.lifecycle.state import WorkerState
from pyworker.serving.compose import Worker, compose_worker
from tests.conftest import MASTER_TOKEN, OPERATOR_HEADERS, KeyPair, wait_until
from tests.fakes.nvml import FakeGpu, FakeNvml
from tests.support.fake_autoscaler import FakeAutoscaler
from tests.support.logging_model_server import LOADED_LINE
from tests.support.processes import spawn, stop
from tests.support.states import advance

REPOSITORY = Path(__file__).resolve().parents[2]
CONFIG = """
name = "deadline"
[model_server]
base_url = "{url}"
log_file = "{log}"
health_path = "/health"
model_id = "{model}"
load_patterns = ["Application startup complete."]
[[routes]]
path = "/v1/completions"
workload = "max_tokens"
[benchmark]
dataset = [{{ max_tokens = 8 }}]
rounds = 1
concurrency = 2
"""


class Scene:
    def __init__(self, tmp_path: Path, autoscaler: FakeAutoscaler, model_url: str) -> None:
        self.tmp_path = tmp_path
        self.autoscaler = autoscaler
        self.model_url = model_url
        self.log = tmp_path / "model.log"
        self.session = aiohttp.ClientSession()

    def env(self, **variables: str) -> dict[str, str]:
        environ = dict(os.environ)
        environ.update(
            REPORT_ADDR=self.autoscaler.url,
            CONTAINER_ID="7",
            UNSECURED="true",
            PYWORKER_CACHE_DIR=str(self.tmp_path / "cache"),
            PYTHONPATH=str(REPOSITORY),
            WORKER_HOST="127.0.0.1",
            MASTER_TOKEN=MASTER_TOKEN,
        )
        environ.update(variables)
        return environ

    async def start_worker(
        self, model: str = "tiny", **variables: str
    ) -> tuple[asyncio.subprocess.Process, str]:
        config = self.tmp_path / "worker.toml"
        config.write_text(CONFIG.format(url=self.model_url, log=self.log, model=model))
        return await spawn(
            "-m", "pyworker", "run", str(config), "--port", "0", env=self.env(**variables)
        )

    async def control(self, path: str, body: dict[str, Any] | None = None) -> Any:
        async with self.session.post(self.model_url + path, json=body or {}) as response:
            assert response.status == 200
            return await response.json()

    async def completions_served(self) -> int:
        async with self.session.get(self.model_url + "/control/stats") as response:
            count: int = (await response.json())["completions"]
            return count

    async def ready_state(self, url: str) -> tuple[int, dict[str, Any]]:
        async with self.session.get(url + "/ready", headers=OPERATOR_HEADERS) as response:
            return response.status, await response.json(content_type=None)

    async def wait_report(
        self, predicate: Callable[[dict[str, Any]], bool], after: int = 0, timeout: float = 15.0
    ) -> dict[str, Any]:
        return await self.autoscaler.wait_report(predicate, after, timeout)


@pytest.fixture
async def scene(tmp_path: Path, keypair: KeyPair) -> AsyncIterator[Scene]:
    async with FakeAutoscaler(keypair.pem) as autoscaler:
        log = tmp_path / "model.log"
        model, url = await spawn(
            "-m", "tests.support.logging_model_server", "--log", str(log),
            "--load-after", "3600", env=dict(os.environ, PYTHONPATH=str(REPOSITORY)),
        )  # fmt: skip
        scene = Scene(tmp_path, autoscaler, url)
        try:
            yield scene
        finally:
            await scene.session.close()
            await stop(model)


def never_loaded(report: dict[str, Any]) -> bool:
    return str(report["error_msg"]).startswith("model never loaded")


async def test_first_start_deadline_errors_reports_and_recovers(scene: Scene) -> None:
    worker, url = await scene.start_worker(
        PYWORKER_LOAD_TIMEOUT="0.5", PYWORKER_RELOAD_TIMEOUT="0.1"
    )
    try:
        errored = await scene.wait_report(never_loaded)
        assert (
            "after waiting 0.5 s (first start; PYWORKER_LOAD_TIMEOUT=0.5)" in errored["error_msg"]
        )
        assert errored["max_perf"] == 0.0 and errored["id"] == 7
        status, body = await scene.ready_state(url)
        assert status == 503 and body["state"] == "errored"
        assert body["error"] == errored["error_msg"]

        mark = len(scene.autoscaler.worker_status)
        await scene.control("/control/load")  # the model finally loads
        ready = await scene.wait_report(lambda r: r["error_msg"] == "" and r["max_perf"] > 0, mark)
        assert ready["loadtime"] > 0
        status, _ = await scene.ready_state(url)
        assert status == 200
        benchmarked = await scene.completions_served()
        assert benchmarked > 1  # the first answer, then the ramp
    finally:
        assert await stop(worker) == 0

    # A restart on this machine: the start script truncates the model log, and the model,
    # already on disk here, hangs. The shorter deadline applies, then the cache makes it ready.
    os.truncate(scene.log, 0)
    mark = len(scene.autoscaler.worker_status)
    worker, url = await scene.start_worker(
        PYWORKER_LOAD_TIMEOUT="600", PYWORKER_RELOAD_TIMEOUT="0.5"
    )
    try:
        errored = await scene.wait_report(never_loaded, mark)
        assert (
            "after waiting 0.5 s (restart of a model that loaded here before; "
            in (errored["error_msg"])
        )
        assert "PYWORKER_RELOAD_TIMEOUT=0.5" in errored["error_msg"]
        mark = len(scene.autoscaler.worker_status)
        await scene.control("/control/log", {"line": LOADED_LINE})
        await scene.wait_report(lambda r: r["error_msg"] == "" and r["max_perf"] > 0, mark)
        assert await scene.completions_served() == benchmarked  # from the cache
    finally:
        assert await stop(worker) == 0


async def test_a_model_that_loads_in_time_never_sees_the_deadline(scene: Scene) -> None:
    worker, _ = await scene.start_worker(PYWORKER_LOAD_TIMEOUT="30")
    try:
        await scene.wait_report(lambda r: r["error_msg"] == "" and r["loadtime"] == 0.0)
        await scene.control("/control/load")
        await scene.wait_report(lambda r: r["max_perf"] > 0)
        assert not any(never_loaded(r) for r in scene.autoscaler.worker_status)
    finally:
        assert await stop(worker) == 0


# --- in process: which deadline applies, and the settings ------------------------------
def _worker(tmp_path: Path, model: str, deadline: LoadDeadline | None) -> Worker:
    raw: dict[str, Any] = {
        "model_server": {
            "model_id": model,
            "log_file": str(tmp_path / "never.log"),  # never written: no load line comes
            "load_patterns": ["model loaded"],
        },
        "routes": [{"path": "/x"}],
        "benchmark": {"cache_file": str(tmp_path / "benchmark.json")},
    }
    worker = compose_worker(
        WorkerConfig.model_validate(raw), Environment.from_env({}), GpuMonitor(FakeNvml([]))
    )
    worker.readiness.load_deadline = deadline
    return worker


async def test_the_benchmark_cache_tells_a_restart_from_a_first_start(tmp_path: Path) -> None:
    from pyworker.lifecycle.benchmark import BenchmarkResult, write_cache

    seen = _worker(tmp_path, "seen-model", None)
    key, cache_file = seen.readiness.benchmarks.cache_entry()
    write_cache(cache_file, BenchmarkResult(12.5, key=key), None)
    assert seen.readiness.benchmarks.loaded_here_before()
    assert not _worker(tmp_path, "another-model", None).readiness.benchmarks.loaded_here_before()
    other_gpu = _worker(tmp_path, "seen-model", None)
    other_gpu.readiness.benchmarks.inventory = await GpuMonitor(FakeNvml([FakeGpu()])).ainventory()
    assert not other_gpu.readiness.benchmarks.loaded_here_before()


async def test_the_deadline_in_process_and_zero_turns_it_off(tmp_path: Path) -> None:
    worker = _worker(tmp_path, "m", LoadDeadline(first_start=0.05, restart=0.05))
    task = asyncio.create_task(worker.readiness.run())
    try:
        await wait_until(lambda: worker.status.state is WorkerState.ERRORED, timeout=5)
        assert worker.status.error_msg == never_loaded_message(0.05, loaded_here_before=False)
    finally:
        task.cancel()
    # A deadline of 0 is none: the watch ends at once and leaves the state alone.
    off = _worker(tmp_path, "m", None)
    advance(off.status, WorkerState.LOADING)
    watch = off.readiness.loading.enforce_deadline(LoadDeadline(first_start=0, restart=0))
    await asyncio.wait_for(watch, 5)
    assert off.status.state is WorkerState.LOADING and off.status.error_msg == ""


async def test_a_health_only_worker_errors_at_the_deadline_and_recovers(
    model_server: Any, tmp_path: Path
) -> None:
    """No log to follow: the first 200 from the health route is the load signal."""
    model_server.recorder.healthy = False  # the engine answers 503 while it loads, for ever
    raw: dict[str, Any] = {
        "model_server": {"base_url": model_server.url, "health_path": "/health"},
        "routes": [{"path": "/echo"}],
        "perf": 5.0,
    }
    worker = compose_worker(
        WorkerConfig.model_validate(raw), Environment.from_env({}), GpuMonitor(FakeNvml([]))
    )
    worker.readiness.load_deadline = LoadDeadline(first_start=0.3, restart=0.3)
    worker.readiness.poll_interval = 0.02
    task = asyncio.create_task(worker.readiness.run())
    try:
        await wait_until(lambda: worker.status.state is WorkerState.ERRORED, timeout=5)
        assert worker.status.error_msg == never_loaded_message(0.3, loaded_here_before=False)
        model_server.recorder.healthy = True  # it loads after all
        await wait_until(lambda: worker.status.ready, timeout=5)
        assert worker.status.error_msg == "" and worker.status.max_perf == 5.0
    finally:
        task.cancel()
        await worker.model.close()


def test_message_says_how_long_and_which_variable() -> None:
    assert never_loaded_message(7200, loaded_here_before=False).startswith(
        "model never loaded: no load signal from the model server after waiting 2 h "
        "(first start; PYWORKER_LOAD_TIMEOUT=7200)."
    )
    restart = never_loaded_message(1800, loaded_here_before=True)
    assert "after waiting 30 min (restart of a model that loaded here before; " in restart
    assert "PYWORKER_RELOAD_TIMEOUT=1800)" in restart
    assert "after waiting 45 s (first start" in never_loaded_message(45, False)


def test_environment_defaults_values_and_bad_values() -> None:
    default = Environment.from_env({}).load_deadline
    assert (default.first_start, default.restart) == (7200.0, 1800.0)
    given = Environment.from_env(
        {"PYWORKER_LOAD_TIMEOUT": "900", "PYWORKER_RELOAD_TIMEOUT": "0"}
    ).load_deadline
    assert (given.seconds(False), given.seconds(True)) == (900.0, 0.0)
    for variable in ("PYWORKER_LOAD_TIMEOUT", "PYWORKER_RELOAD_TIMEOUT"):
        for value in ("soon", "-1", "inf"):
            with pytest.raises(InvalidEnvironment, match=variable):
                Environment.from_env({variable: value})
