"""A model loaded in the worker's own process, in real worker processes.

Each test writes a `worker.py` whose lifecycle appends what happens to it (entered, exited,
cancelled) to a journal file, runs it as `python -m worker` against a recording autoscaler,
and reads the journal after the process has exited: the lifecycle is entered once and exited
once, after the request in flight, or never exited when its `__aenter__` failed or hung.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import ValidationError

from pyworker.config import RouteConfig, WorkerConfig
from pyworker.lifecycle.in_process import InProcessModel, LoadFailed
from pyworker.upstream.functions import FunctionFailed
from pyworker.upstream.model import ModelClient
from tests.conftest import KeyPair
from tests.support.fake_autoscaler import FakeAutoscaler
from tests.support.processes import spawn, stop

REPOSITORY = Path(__file__).resolve().parents[2]

WORKER = """
import asyncio
import contextlib
from pathlib import Path

from pyworker.config import BenchmarkConfig, RouteConfig, WorkerConfig
from pyworker.entry import serve

JOURNAL = Path("journal.txt")


def note(line):
    with JOURNAL.open("a") as journal:
        journal.write(line + "\\n")


@contextlib.asynccontextmanager
async def model():
    note("enter")
    try:
        {enter}
    except asyncio.CancelledError:
        note("cancelled")
        raise
    note("entered")
    try:
        yield
    finally:
        note("exit")


async def generate(payload):
    return {{"text": payload.get("prompt", "")[::-1]}}


async def slow(payload):
    note("started")
    await asyncio.sleep(0.5)
    note("finished")
    return {{"done": True}}


async def forever(payload):
    note("waiting")
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        note("hung-up")
        raise
    return {{}}


def spin(payload):
    note("spinning")
    count = 0
    while not Path("stop").exists():
        for _ in range(100_000):  # pure Python: holds the GIL as much as it can
            count += 1
    note("spun")
    return {{"count": count}}


worker = WorkerConfig(
    name="in-process-test",
    lifecycle=model,
    routes=[
        RouteConfig(path="/generate", function=generate),
        RouteConfig(path="/slow", function=slow),
        RouteConfig(path="/spin", function=spin),
        RouteConfig(path="/forever", function=forever),
    ],
    benchmark=BenchmarkConfig(route="/generate", dataset=[{{"prompt": "abc"}}], rounds=2),
)

if __name__ == "__main__":
    serve(worker)
"""

LOADS = "await asyncio.sleep(0)"
FAILS = 'raise RuntimeError("no weights at /models/x")'
HANGS = "await asyncio.Event().wait()"


@pytest.fixture
async def autoscaler(keypair: KeyPair) -> AsyncIterator[FakeAutoscaler]:
    async with FakeAutoscaler(keypair.pem) as recording:
        yield recording


def environ(autoscaler: FakeAutoscaler, **more: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        REPORT_ADDR=autoscaler.url,
        CONTAINER_ID="11",
        MASTER_TOKEN="token",
        UNSECURED="false",
        PYWORKER_CACHE_DIR=str(Path.cwd() / "cache"),
        PYTHONPATH=str(REPOSITORY),
        WORKER_PORT="0",
        WORKER_HTTP_PORT="0",
        WORKER_HOST="127.0.0.1",
        **more,
    )
    return env


def journal() -> list[str]:
    path = Path("journal.txt")
    return path.read_text().split() if path.exists() else []


async def wait_for_journal(line: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while line not in journal():
        assert time.monotonic() < deadline, f"{line!r} never written: {journal()}"
        await asyncio.sleep(0.02)


def write_worker(enter: str) -> None:
    Path("worker.py").write_text(WORKER.format(enter=enter))


async def start(autoscaler: FakeAutoscaler, enter: str, **more: str) -> tuple[Any, str]:
    write_worker(enter)
    return await spawn("-m", "worker", env=environ(autoscaler, **more))


async def test_entered_once_before_the_benchmark_and_exited_once_after_the_request_in_flight(
    autoscaler: FakeAutoscaler, keypair: KeyPair
) -> None:
    process, url = await start(autoscaler, LOADS)
    try:
        ready = await autoscaler.wait_report(lambda report: report["max_perf"] > 0, timeout=30)
        assert ready["error_msg"] == "" and journal() == ["enter", "entered"]
        body = {"auth_data": keypair.auth_data(url, request_idx=9), "payload": {"prompt": "abc"}}
        async with aiohttp.ClientSession() as session:
            async with session.post(url + "/generate", json=body) as answer:
                assert (answer.status, await answer.json()) == (200, {"text": "cba"})
            request = asyncio.ensure_future(session.post(url + "/slow", json=body))
            await wait_for_journal("started")
            process.send_signal(signal.SIGTERM)  # mid-request: the drain lets it finish
            answer = await request
            assert (answer.status, await answer.json()) == (200, {"done": True})
            answer.release()
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert journal() == ["enter", "entered", "started", "finished", "exit"]


async def test_a_cpu_bound_sync_function_leaves_health_reports_and_routes_answering(
    autoscaler: FakeAutoscaler, keypair: KeyPair
) -> None:
    process, url = await start(autoscaler, LOADS)
    try:
        await autoscaler.wait_report(lambda report: report["max_perf"] > 0, timeout=30)
        before = len(autoscaler.worker_status)
        body = {"auth_data": keypair.auth_data(url, request_idx=5), "payload": {"prompt": "ab"}}
        async with aiohttp.ClientSession() as session:
            spinning = asyncio.ensure_future(session.post(url + "/spin", json=body))
            await wait_for_journal("spinning")
            async with session.get(url + "/health") as health:
                assert health.status == 200
            async with session.post(url + "/generate", json=body) as answer:
                assert (answer.status, await answer.json()) == (200, {"text": "ba"})
            # The report of the request received, sent while the function still runs.
            await autoscaler.wait_report(lambda report: report["new_load"] > 0, after=before)
            assert "spun" not in journal()  # all of it answered while the function ran
            await asyncio.to_thread(Path("stop").touch)
            answer = await spinning
            assert answer.status == 200 and (await answer.json())["count"] > 0
            answer.release()
    finally:
        assert await stop(process) == 0
    assert journal() == ["enter", "entered", "spinning", "spun", "exit"]


async def test_a_client_hang_up_cancels_its_async_function(
    autoscaler: FakeAutoscaler, keypair: KeyPair
) -> None:
    process, url = await start(autoscaler, LOADS)
    try:
        await autoscaler.wait_report(lambda report: report["max_perf"] > 0, timeout=30)
        body = {"auth_data": keypair.auth_data(url, request_idx=6), "payload": {}}
        async with aiohttp.ClientSession() as session:
            request = asyncio.ensure_future(session.post(url + "/forever", json=body))
            await wait_for_journal("waiting")
            request.cancel()  # the client hangs up
        await wait_for_journal("hung-up")
    finally:
        assert await stop(process) == 0
    assert journal() == ["enter", "entered", "waiting", "hung-up", "exit"]


async def test_a_failing_aenter_is_the_error_msg_and_health_keeps_answering(
    autoscaler: FakeAutoscaler,
) -> None:
    process, url = await start(autoscaler, FAILS)
    try:
        errored = await autoscaler.wait_report(lambda report: report["error_msg"] != "")
        message = errored["error_msg"]
        assert "model lifecycle model failed to load" in message
        assert "RuntimeError: no weights at /models/x" in message
        async with aiohttp.ClientSession() as session, session.get(url + "/health") as health:
            assert health.status == 200 and (await health.json())["state"] == "errored"
    finally:
        assert await stop(process) == 0
    assert journal() == ["enter"]  # as with `async with`: a failed enter is never exited


async def test_a_hang_past_the_load_deadline_is_the_error_msg_and_is_stopped_at_shutdown(
    autoscaler: FakeAutoscaler,
) -> None:
    process, url = await start(autoscaler, HANGS, PYWORKER_LOAD_TIMEOUT="1")
    try:
        errored = await autoscaler.wait_report(lambda report: report["error_msg"] != "")
        assert "model lifecycle model was not entered" in errored["error_msg"]
        assert "PYWORKER_LOAD_TIMEOUT=1" in errored["error_msg"]
        async with aiohttp.ClientSession() as session, session.get(url + "/health") as health:
            assert health.status == 200
    finally:
        assert await stop(process) == 0
    assert journal() == ["enter", "cancelled"]


# --- the lifecycle object itself -------------------------------------------------------------
class Recorded:
    """An async context manager that records each enter and exit."""

    def __init__(self) -> None:
        self.events: list[str] = []

    async def __aenter__(self) -> Recorded:
        self.events.append("enter")
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.events.append("exit")


async def test_any_number_of_loads_and_unloads_enter_once_and_exit_once() -> None:
    manager = Recorded()
    model = InProcessModel(manager, "Recorded")
    await asyncio.gather(model.load(), model.load(), model.load())
    assert model.entered and manager.events == ["enter"]
    await asyncio.gather(model.unload(), model.unload())
    await model.unload()
    assert manager.events == ["enter", "exit"]


async def test_a_cancelled_waiter_leaves_the_load_running() -> None:
    release = asyncio.Event()
    events: list[str] = []

    @contextlib.asynccontextmanager
    async def slow() -> AsyncIterator[None]:
        await release.wait()
        events.append("entered")
        yield
        events.append("exited")

    model = InProcessModel(slow, "slow")
    waiter = asyncio.ensure_future(model.load())
    await asyncio.sleep(0)
    waiter.cancel()
    release.set()
    await model.load()  # the same load, not a second one
    await model.unload()
    assert events == ["entered", "exited"]


async def test_a_setup_and_teardown_pair_runs_a_sync_setup_in_a_thread() -> None:
    threads: list[str] = []

    def setup() -> None:
        threads.append(threading.current_thread().name)

    async def teardown() -> None:
        threads.append("teardown")

    config = WorkerConfig(
        routes=[RouteConfig(path="/x", function=lambda payload: payload)],
        setup=setup,
        teardown=teardown,
    )
    model = InProcessModel.from_config(config)
    assert model is not None and model.name.endswith("setup")
    await model.load()
    assert threads[0] != threading.current_thread().name
    await model.unload()
    assert threads[1:] == ["teardown"]


async def test_a_factory_that_makes_no_context_manager_fails_the_load_naming_it() -> None:
    def factory() -> object:
        return object()

    model = InProcessModel(factory, "factory")  # type: ignore[arg-type]
    with pytest.raises(LoadFailed, match="factory returned object, not an async context"):
        await model.load()
    await model.unload()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"lifecycle": contextlib.redirect_stdout(None)}, "is a plain (sync) context manager"),
        ({"lifecycle": 3}, "must be an async context manager"),
        ({"teardown": contextlib.nullcontext}, "teardown is given without setup"),
        (
            {"lifecycle": contextlib.nullcontext(), "setup": contextlib.nullcontext},
            "either lifecycle or setup",
        ),
        (
            {
                "lifecycle": contextlib.nullcontext(),
                "model_server": {"load_patterns": ["loaded"]},
            },
            "the model is loaded when it is entered",
        ),
    ],
)
def test_a_loader_the_worker_cannot_use_is_refused_saying_why(
    fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        WorkerConfig.model_validate({"routes": [{"path": "/x"}], **fields})


def test_a_function_route_refuses_what_is_for_a_model_server() -> None:
    with pytest.raises(ValidationError, match="remove upstream_path, body_encoder"):
        RouteConfig(
            path="/x",
            function=lambda payload: payload,
            upstream_path="/y",
            body_encoder=lambda payload: payload,
        )


async def test_the_lifecycle_is_exited_after_a_timed_out_sync_function_ends() -> None:
    manager = Recorded()
    release = threading.Event()

    def hold(payload: dict[str, Any]) -> dict[str, Any]:
        release.wait(30)
        manager.events.append("function ended")
        return {}

    client = ModelClient("http://127.0.0.1:9", 1.0)
    model = InProcessModel(manager, "Recorded", client)
    await model.load()
    with pytest.raises(FunctionFailed, match="took over"):
        await client.call_function(hold, {}, 0.01)  # 504; its thread runs on
    unloading = asyncio.ensure_future(model.unload())
    done, _ = await asyncio.wait({unloading}, timeout=0.2)
    assert not done
    release.set()
    await unloading
    assert manager.events == ["enter", "function ended", "exit"]
    await client.close()
