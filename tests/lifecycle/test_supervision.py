"""Every long-lived task survives a failure: it is reported to the autoscaler, or restarted.

Each test injects a failure into one task of a worker running in-process against a model
server and a recording autoscaler on loopback, then checks what the autoscaler received and
that the worker still answers a signed request.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from pyworker.config import WorkerConfig
from pyworker.config.environment import Environment
from pyworker.lifecycle.gpu import GpuMonitor, GpuSampler
from pyworker.lifecycle.logfollow import LogFollower
from pyworker.lifecycle.readiness import health as health_module
from pyworker.lifecycle.supervision import Backoff, Supervisor, run_all
from pyworker.serving.compose import Worker, compose_worker
from pyworker.serving.server import RUNNER_OPTIONS
from tests.conftest import KeyPair, wait_until
from tests.fakes.nvml import FakeGpu, FakeNvml
from tests.support.fake_autoscaler import FakeAutoscaler

LOADED = "Application startup complete."


class Engine:
    """A model server that drops the first `drops` connections it gets a request on."""

    def __init__(self) -> None:
        self.drops = 0
        self.calls = 0
        self.healthy = True
        self.closed_calls: list[dict[str, Any]] = []
        self.server = TestServer(self._app(), host="127.0.0.1")

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    def _app(self) -> web.Application:
        async def generate(request: web.Request) -> web.Response:
            self.calls += 1
            if self.calls <= self.drops:
                assert request.transport is not None
                request.transport.abort()  # the engine drops the connection: no answer at all
                return web.Response()
            return web.json_response({"text": "ok"})

        async def health(request: web.Request) -> web.Response:
            return web.Response(status=200 if self.healthy else 503)

        async def closed(request: web.Request) -> web.Response:
            self.closed_calls.append(await request.json())
            return web.json_response({})

        app = web.Application()
        app.router.add_post("/generate", generate)
        app.router.add_get("/health", health)
        app.router.add_post("/closed", closed)
        return app


class Scene:
    def __init__(self, tmp_path: Path, keypair: KeyPair) -> None:
        self.tmp_path = tmp_path
        self.keypair = keypair
        self.engine = Engine()
        self.autoscaler = FakeAutoscaler(keypair.pem)
        self.servers: list[TestServer] = []
        self.session = aiohttp.ClientSession()
        self.worker: Worker | None = None
        self.url = ""

    async def start(self, **config: Any) -> Worker:
        raw: dict[str, Any] = {
            "model_server": {"base_url": self.engine.url},
            "routes": [{"path": "/generate"}],
            "benchmark": {"rounds": 1, "concurrency": 2, "dataset": [{"prompt": "x"}]},
        }
        for key, value in config.items():
            if isinstance(value, dict) and isinstance(raw.get(key), dict):
                raw[key] = {**raw[key], **value}
            else:
                raw[key] = value
        environ = {
            "REPORT_ADDR": self.autoscaler.url,
            "CONTAINER_ID": "7",
            "UNSECURED": "false",
            "PUBLIC_IPADDR": "127.0.0.1",
            "VAST_TCP_PORT_3000": "1",  # the address KeyPair.auth_data signs by default
            "PYWORKER_REPORT_INTERVAL": "0.05",
            "PYWORKER_CACHE_DIR": str(self.tmp_path / "cache"),
        }
        worker = compose_worker(WorkerConfig.model_validate(raw), Environment.from_env(environ))
        worker.reporter.idle_interval = 0.2
        worker = replace(worker, supervisor=Supervisor(lambda: Backoff(first=0.05, maximum=0.2)))
        server = TestServer(worker.create_app(), host="127.0.0.1", **RUNNER_OPTIONS)
        await server.start_server()
        self.servers.append(server)
        self.worker = worker
        self.url = str(server.make_url("")).rstrip("/")
        return worker

    async def close(self) -> None:
        await self.session.close()
        for server in self.servers:
            await server.close()
        await self.engine.server.close()
        await self.autoscaler.close()

    async def report_where(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """Wait for a status report that satisfies `predicate`; return it."""
        await wait_until(lambda: any(predicate(r) for r in self.autoscaler.worker_status), 15)
        return next(r for r in self.autoscaler.worker_status if predicate(r))

    async def ready_report(self) -> dict[str, Any]:
        """The first report, after the current ones, saying the worker is ready and well."""
        seen = len(self.autoscaler.worker_status)
        await wait_until(
            lambda: any(
                r["max_perf"] > 0 and r["error_msg"] == ""
                for r in self.autoscaler.worker_status[seen:]
            ),
            15,
        )
        return self.autoscaler.worker_status[-1]

    async def serves(self, request_idx: int = 1) -> None:
        """A signed request is answered by the engine, and its request_idx reported done."""
        body = {"auth_data": self.keypair.auth_data(request_idx=request_idx), "payload": {}}
        async with self.session.post(self.url + "/generate", json=body) as answer:
            assert answer.status == 200, await answer.text()
            assert await answer.json() == {"text": "ok"}
        await wait_until(lambda: request_idx in self.finished_idxs(), 15)

    def finished_idxs(self) -> list[int]:
        return [i["request_idx"] for b in self.autoscaler.delete_requests for i in b["requests"]]


@pytest.fixture
async def scene(tmp_path: Path, keypair: KeyPair) -> AsyncIterator[Scene]:
    scene = Scene(tmp_path, keypair)
    await scene.engine.server.start_server()
    await scene.autoscaler.start()
    yield scene
    await scene.close()


def fail_once(original: Callable[..., Any], error: Exception) -> Callable[..., Any]:
    """`original`, except that its first call raises `error`."""
    calls = 0

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise error
        return original(*args, **kwargs)

    return wrapper


# --- readiness -------------------------------------------------------------------------------
async def test_a_dropped_warm_up_connection_is_retried_and_the_worker_gets_ready(
    scene: Scene,
) -> None:
    scene.engine.drops = 2
    await scene.start()
    await scene.ready_report()
    assert scene.engine.calls >= 3  # two dropped warm-ups, then the answer and the round
    await scene.serves()


async def test_an_engine_that_always_drops_the_warm_up_is_a_reported_error(scene: Scene) -> None:
    scene.engine.drops = 10**9
    worker = await scene.start(benchmark={"connect_wait": 0.5})
    report = await scene.report_where(lambda r: "benchmark failed" in r["error_msg"])
    assert "dropped the warm-up connection" in report["error_msg"]
    assert report["max_perf"] == 0.0
    assert worker.status.state == "errored"
    body = {"auth_data": scene.keypair.auth_data(), "payload": {}}
    async with scene.session.post(scene.url + "/generate", json=body) as answer:
        assert answer.status == 503  # not ready: said clearly, and nothing reached the engine
    assert "request_idx" not in str(scene.autoscaler.delete_requests)


async def test_after_a_failed_benchmark_readiness_tries_again_and_recovers(scene: Scene) -> None:
    scene.engine.drops = 10**9
    worker = await scene.start(benchmark={"connect_wait": 0.3})
    worker.readiness.retry.first = 0.2
    await scene.report_where(lambda r: "dropped the warm-up connection" in r["error_msg"])
    scene.engine.drops = 0  # the engine recovers by itself: no load line, no restart
    await scene.ready_report()
    await scene.serves()


async def test_a_dataset_line_that_is_not_json_is_a_reported_error(scene: Scene) -> None:
    dataset = scene.tmp_path / "dataset.jsonl"
    dataset.write_text('{"prompt": "a"}\n{"prompt": "b"}\nnot json at all\n')
    await scene.start(benchmark={"dataset": None, "dataset_file": str(dataset)})
    report = await scene.report_where(lambda r: "not JSON" in r["error_msg"])
    assert f"{dataset}, line 3: not JSON" in report["error_msg"]
    assert scene.engine.calls == 0


async def test_a_crashed_readiness_task_is_reported_then_restarted(scene: Scene) -> None:
    worker = await scene.start()
    readiness = worker.readiness
    readiness._drive = fail_once(readiness._drive, RuntimeError("injected"))  # type: ignore[method-assign]
    report = await scene.report_where(lambda r: "readiness failed" in r["error_msg"])
    assert report["error_msg"] == "worker task readiness failed: RuntimeError: injected"
    await scene.ready_report()
    assert worker.supervisor.failures == {"readiness": 1}
    await scene.serves()


async def test_a_crashed_log_follower_is_reported_and_the_log_read_again(
    scene: Scene, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = scene.tmp_path / "model.log"
    log.write_text(f"starting\n{LOADED}\n")
    monkeypatch.setattr(LogFollower, "classify", fail_once(LogFollower.classify, OSError("boom")))
    worker = await scene.start(model_server={"log_file": str(log), "load_patterns": [LOADED]})
    await scene.report_where(lambda r: "OSError: boom" in r["error_msg"])
    await scene.ready_report()
    assert worker.supervisor.failures == {"readiness": 1}
    await scene.serves()


async def test_a_crashed_health_watch_is_reported_and_readiness_starts_again(
    scene: Scene, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = await scene.start(model_server={"health_path": "/health", "health_interval": 0.05})
    await scene.ready_report()
    probe = health_module.probe_health
    monkeypatch.setattr(
        health_module,
        "probe_health",
        fail_once(probe, ValueError("bad health answer")),
    )
    await scene.report_where(lambda r: "ValueError: bad health answer" in r["error_msg"])
    await scene.ready_report()
    await scene.serves()
    assert worker.supervisor.failures == {"readiness": 1}


# --- the other tasks ---------------------------------------------------------------------------
async def test_a_crashed_reporter_is_restarted_and_reports_again(scene: Scene) -> None:
    worker = await scene.start()
    await scene.ready_report()
    reporter = worker.reporter
    reporter.build_status = fail_once(reporter.build_status, KeyError("x"))  # type: ignore[method-assign]
    worker.status.set_perf(worker.status.max_perf + 1)  # a change: a report at once, which fails
    await wait_until(lambda: worker.supervisor.failures.get("reporter") == 1)
    seen = len(scene.autoscaler.worker_status)
    await wait_until(lambda: len(scene.autoscaler.worker_status) > seen)
    await scene.serves()


async def test_a_failing_key_fetch_is_restarted_until_the_key_loads(scene: Scene) -> None:
    worker = await scene.start()
    worker.verifier.load_pem = fail_once(worker.verifier.load_pem, TypeError("bad"))  # type: ignore[method-assign]
    await scene.ready_report()
    assert worker.supervisor.failures == {"public-key": 1}
    await scene.serves()


async def test_a_crashed_session_sweep_is_restarted_and_sessions_still_expire(
    scene: Scene,
) -> None:
    worker = await scene.start(sessions={"sweep_interval": 0.05})
    await scene.ready_report()
    worker.sessions.sweep = fail_once(worker.sessions.sweep, RuntimeError("sweep"))  # type: ignore[method-assign]
    auth = scene.keypair.auth_data(request_idx=31)
    body = {"auth_data": auth, "payload": {"lifetime": 0.2, "on_close_route": "/closed"}}
    async with scene.session.post(scene.url + "/session/create", json=body) as answer:
        assert answer.status == 201 or answer.status == 200, await answer.text()
        session_id = (await answer.json())["session_id"]
    await wait_until(lambda: 31 in scene.finished_idxs(), 15)  # expired, closed and reported
    assert worker.supervisor.failures == {"session-sweep": 1}
    assert scene.engine.closed_calls == [{"session_id": session_id}]
    await scene.serves()


async def test_a_session_close_call_that_crashes_is_logged_and_the_worker_serves(
    scene: Scene, caplog: pytest.LogCaptureFixture
) -> None:
    worker = await scene.start()
    await scene.ready_report()

    async def crash(session: object) -> None:
        raise RuntimeError("close call crashed")

    worker.sessions._notify = crash  # type: ignore[method-assign]
    body = {"auth_data": scene.keypair.auth_data(request_idx=41), "payload": {"lifetime": 60}}
    body["payload"]["on_close_route"] = "/closed"
    async with scene.session.post(scene.url + "/session/create", json=body) as answer:
        session_id = (await answer.json())["session_id"]
    end = {"session_id": session_id, "session_auth": body["auth_data"]}
    async with scene.session.post(scene.url + "/session/end", json=end) as answer:
        assert answer.status == 200
    await wait_until(lambda: "close call crashed" in caplog.text)
    assert "task session close call failed" in caplog.text and "Traceback" in caplog.text
    await wait_until(lambda: 41 in scene.finished_idxs(), 15)
    await scene.serves()


# --- the GPU sampler thread -------------------------------------------------------------------
def test_the_gpu_sampler_survives_failing_readings(caplog: pytest.LogCaptureFixture) -> None:
    nvml = FakeNvml([FakeGpu()])
    monitor = GpuMonitor(nvml)
    failures = 3
    original = monitor.sample
    lock = threading.Lock()

    def flaky() -> Any:
        nonlocal failures
        with lock:
            if failures:
                failures -= 1
                raise RuntimeError("NVML hiccup")
        return original()

    monitor.sample = flaky  # type: ignore[method-assign]
    sampler = GpuSampler(monitor, interval=0.01)
    sampler.start()
    try:
        deadline = threading.Event()
        for _ in range(500):
            if sampler.samples_taken >= 2:
                break
            deadline.wait(0.01)
        assert sampler.samples_taken >= 2 and sampler.running
    finally:
        summary = sampler.stop()
    assert summary.sample_count >= 2
    assert caplog.text.count("GPU sampling failed") == 3


def test_the_gpu_sampler_gives_up_after_failures_in_a_row() -> None:
    monitor = GpuMonitor(FakeNvml([FakeGpu()]))

    def broken() -> Any:
        raise RuntimeError("GPU gone")

    monitor.sample = broken  # type: ignore[method-assign]
    sampler = GpuSampler(monitor, interval=0.001)
    sampler.start()
    thread = sampler._thread
    assert thread is not None
    thread.join(timeout=30)
    assert not thread.is_alive() and sampler.samples_taken == 0
    sampler.stop()


# --- the helper itself -----------------------------------------------------------------------
async def test_the_supervisor_backs_off_and_reports_each_failure() -> None:
    failures: list[str] = []
    runs = 0
    done = asyncio.Event()

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs < 4:
            raise RuntimeError(f"run {runs}")
        done.set()

    supervisor = Supervisor(lambda: Backoff(first=0.01, maximum=0.02))
    supervisor.supervise("flaky", flaky, on_failure=lambda name, e: failures.append(str(e)))
    await asyncio.wait_for(done.wait(), 5)
    assert failures == ["run 1", "run 2", "run 3"] and supervisor.failures == {"flaky": 3}
    await wait_until(lambda: len(supervisor) == 0)  # a task that returns is done


def test_backoff_doubles_to_its_bound_and_resets_after_a_stable_run() -> None:
    backoff = Backoff(first=1, maximum=5, stable_after=60)
    assert [backoff.delay(0) for _ in range(5)] == [1, 2, 4, 5, 5]
    assert backoff.delay(61) == 1


async def test_run_all_cancels_the_siblings_of_a_failed_coroutine() -> None:
    sibling_cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            sibling_cancelled.set()
            raise

    async def fail() -> None:
        await asyncio.sleep(0)
        raise LookupError("first")

    with pytest.raises(LookupError):
        await run_all(forever(), fail())
    assert sibling_cancelled.is_set()


async def test_a_failure_handler_that_fails_is_logged_and_the_task_restarts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR)
    second_run = asyncio.Event()
    calls = 0

    async def task() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("first")
        second_run.set()

    def handler(name: str, error: BaseException) -> None:
        raise ValueError("handler broke")

    supervisor = Supervisor(lambda: Backoff(first=0.01))
    supervisor.supervise("t", task, on_failure=handler)
    await asyncio.wait_for(second_run.wait(), 5)
    assert "the failure handler of task t failed" in caplog.text


# --- closing ----------------------------------------------------------------------------------
async def test_closing_ends_a_task_that_turned_its_cancellation_into_an_error() -> None:
    """asyncio.wait_for's race on 3.10/3.11 can turn a cancel into TimeoutError: no restart."""
    supervisor = Supervisor(backoff=lambda: Backoff(first=0.01))
    starts = 0
    stopping = asyncio.Event()

    async def swallows() -> None:
        nonlocal starts
        starts += 1
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            stopping.set()
            raise TimeoutError("cancelled, as wait_for may report it") from None

    supervisor.supervise("swallows", swallows)
    await wait_until(lambda: starts == 1)
    await asyncio.wait_for(supervisor.aclose(), 5)
    assert stopping.is_set()
    assert starts == 1
    assert len(supervisor) == 0


async def test_closing_gives_up_on_a_task_that_will_not_stop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    supervisor = Supervisor()
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue

    task = supervisor.supervise("stubborn", stubborn)
    await asyncio.sleep(0)
    await asyncio.wait_for(supervisor.aclose(patience=0.2), 5)
    assert "stubborn" in caplog.text and "did not stop" in caplog.text
    release.set()
    await asyncio.wait_for(task, 5)
