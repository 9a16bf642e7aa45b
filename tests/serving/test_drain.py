"""Graceful drain: SIGTERM lets requests in flight finish, refuses new ones, then exits 0."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from pyworker.config import WorkerConfig
from pyworker.config.environment import Environment, InvalidEnvironment
from pyworker.lifecycle.accounting import Outcome
from pyworker.lifecycle.state import WorkerState
from pyworker.protocol.messages import DELETE_REQUESTS_PATH, PUBKEY_PATH, STATUS_PATH
from pyworker.serving.compose import compose_worker
from pyworker.serving.drain import drain, run_hooks
from pyworker.serving.server import RUNNER_OPTIONS
from tests.conftest import KeyPair, ModelServer, RunningWorker, WorkerFactory, wait_until

HELD_STREAM = {"chunks": 3, "hold_after_first": True}
REST_OF_STREAM = b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n"


class WorkerProcess:
    def __init__(self, process: asyncio.subprocess.Process, url: str) -> None:
        self.process = process
        self.url = url


@pytest.fixture
async def start_process(tmp_path: Path, model_server: ModelServer) -> AsyncIterator[Any]:
    """Start `pyworker run` on a free port in front of the fake model server."""
    processes: list[asyncio.subprocess.Process] = []

    async def start(**environ: str) -> WorkerProcess:
        config = tmp_path / "worker.toml"
        config.write_text(
            f'[model_server]\nbase_url = "{model_server.url}"\n'
            '[[routes]]\npath = "/stream"\n[[routes]]\npath = "/echo"\n'
        )
        drop = ("CONTAINER_ID", "REPORT_ADDR", "UNSECURED", "PYWORKER_GRACE")
        env = {k: v for k, v in os.environ.items() if k not in drop} | environ
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pyworker", "run", str(config), "--port", "0",
            stdout=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        processes.append(process)
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        match = re.search(rb"listening on (http://\S+)", line)
        assert match, line
        return WorkerProcess(process, match.group(1).decode())

    yield start
    for process in processes:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def echo_status(client: aiohttp.ClientSession, url: str, keypair: KeyPair) -> int:
    body = {"auth_data": keypair.auth_data(), "payload": {"prompt": "hi"}}
    async with client.post(url + "/echo", json=body) as response:
        await response.read()
        status: int = response.status
        return status


async def wait_for_status(
    client: aiohttp.ClientSession, url: str, keypair: KeyPair, wanted: int
) -> None:
    deadline = time.monotonic() + 15
    while await echo_status(client, url, keypair) != wanted:
        assert time.monotonic() < deadline, f"never answered {wanted}"
        await asyncio.sleep(0.02)


# --- the process ----------------------------------------------------------------------------
async def test_sigterm_finishes_a_stream_refuses_new_requests_then_exits_0(
    start_process: Any, model_server: ModelServer, keypair: KeyPair
) -> None:
    worker: WorkerProcess = await start_process()
    async with aiohttp.ClientSession() as client:
        await wait_for_status(client, worker.url, keypair, 200)
        body = {"auth_data": keypair.auth_data(), "payload": HELD_STREAM}
        async with client.post(worker.url + "/stream", json=body) as stream:
            assert await stream.content.readuntil(b"\n\n") == b"data: 0\n\n"
            worker.process.send_signal(signal.SIGTERM)
            await wait_for_status(client, worker.url, keypair, 503)
            async with client.post(worker.url + "/echo", json={**body, "payload": {}}) as answer:
                assert answer.status == 503 and int(answer.headers["Retry-After"]) >= 1
                assert (await answer.json())["state"] == "draining"
            assert worker.process.returncode is None
            model_server.recorder.release.set()
            assert await asyncio.wait_for(stream.content.read(), 10) == REST_OF_STREAM
    assert await asyncio.wait_for(worker.process.wait(), 15) == 0


async def test_the_grace_period_bounds_the_wait(
    start_process: Any, model_server: ModelServer, keypair: KeyPair
) -> None:
    worker: WorkerProcess = await start_process(PYWORKER_GRACE="0.5")
    async with aiohttp.ClientSession() as client:
        await wait_for_status(client, worker.url, keypair, 200)
        body = {"auth_data": keypair.auth_data(), "payload": HELD_STREAM}
        async with client.post(worker.url + "/stream", json=body) as stream:
            assert await stream.content.readuntil(b"\n\n") == b"data: 0\n\n"
            started = time.monotonic()
            worker.process.send_signal(signal.SIGTERM)
            with pytest.raises(aiohttp.ClientPayloadError):
                await asyncio.wait_for(stream.content.read(), 10)
    assert await asyncio.wait_for(worker.process.wait(), 15) == 0
    assert time.monotonic() - started >= 0.5


@pytest.mark.parametrize(("second", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
async def test_a_second_signal_exits_at_once(
    start_process: Any, keypair: KeyPair, second: signal.Signals, code: int
) -> None:
    worker: WorkerProcess = await start_process(PYWORKER_GRACE="60")
    async with aiohttp.ClientSession() as client:
        await wait_for_status(client, worker.url, keypair, 200)
        body = {"auth_data": keypair.auth_data(), "payload": HELD_STREAM}
        async with client.post(worker.url + "/stream", json=body) as stream:
            assert await stream.content.readuntil(b"\n\n") == b"data: 0\n\n"
            worker.process.send_signal(signal.SIGTERM)
            await wait_for_status(client, worker.url, keypair, 503)  # draining, for up to 60 s
            worker.process.send_signal(second)
            assert await asyncio.wait_for(worker.process.wait(), 5) == code


# --- in process -----------------------------------------------------------------------------
async def test_drain_waits_then_closes_sessions_then_runs_hooks(
    start_worker: WorkerFactory, keypair: KeyPair, model_server: ModelServer
) -> None:
    worker = await start_worker()
    seen: list[tuple[int, float, int]] = []

    async def last_report() -> None:
        ledger = worker.worker.ledger
        seen.append((ledger.in_progress, ledger.current_load, len(worker.worker.sessions)))

    async def broken() -> None:
        raise RuntimeError("a broken hook must not stop the drain")

    worker.worker.drainable.hooks.extend([last_report, broken])
    payload = {"on_close_route": "/echo", "on_close_payload": {"closing": True}}
    session = {"auth_data": keypair.auth_data(request_idx=8), "payload": payload}
    async with worker.post("/session/create", session) as response:
        session_id = (await response.json())["session_id"]
    body = {"auth_data": keypair.auth_data(request_idx=9), "payload": HELD_STREAM}
    async with worker.post("/stream", body) as stream:
        assert await stream.content.readuntil(b"\n\n") == b"data: 0\n\n"
        draining = asyncio.create_task(drain(worker.worker.drainable, grace=30))
        await wait_until(lambda: worker.worker.status.state is WorkerState.DRAINING)
        for path in ("/echo", "/session/create"):
            async with worker.post(path, body) as refused:
                assert refused.status == 503 and "Retry-After" in refused.headers
        assert not draining.done() and seen == []
        model_server.recorder.release.set()
        assert await stream.content.read() == REST_OF_STREAM
    await asyncio.wait_for(draining, 10)
    assert seen == [(0, 0.0, 0)]
    assert {"closing": True, "session_id": session_id} in model_server.recorder.payloads
    finished = {r.request_idx: r.outcome for r in worker.worker.ledger.take_finished()}
    assert finished == {8: Outcome.SUCCESS, 9: Outcome.SUCCESS}


async def test_drain_cuts_what_outlives_the_grace_period(
    start_worker: WorkerFactory, keypair: KeyPair, model_server: ModelServer
) -> None:
    worker = await start_worker()
    body = {"auth_data": keypair.auth_data(request_idx=5), "payload": {"wait_release": True}}
    held = asyncio.create_task(_status(worker, "/slow", body))
    await wait_until(lambda: model_server.recorder.active == 1)
    started = time.monotonic()
    await asyncio.wait_for(drain(worker.worker.drainable, grace=0.3), 10)
    assert time.monotonic() - started >= 0.3
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await held
    ((request_idx, outcome),) = [
        (r.request_idx, r.outcome) for r in worker.worker.ledger.take_finished()
    ]
    assert (request_idx, outcome) == (5, Outcome.CANCELLED)


async def test_the_last_report_reaches_the_autoscaler_before_the_drain_ends(
    keypair: KeyPair, model_server: ModelServer
) -> None:
    received: list[tuple[str, dict[str, Any]]] = []

    async def pubkey(request: web.Request) -> web.Response:
        return web.Response(body=keypair.pem)

    async def record(request: web.Request) -> web.Response:
        received.append((request.path, await request.json()))
        return web.json_response({})

    autoscaler_app = web.Application()
    autoscaler_app.router.add_get(PUBKEY_PATH, pubkey)
    autoscaler_app.router.add_post(STATUS_PATH, record)
    autoscaler_app.router.add_post(DELETE_REQUESTS_PATH, record)
    autoscaler = TestServer(autoscaler_app, host="127.0.0.1")
    await autoscaler.start_server()
    environ = {
        "REPORT_ADDR": str(autoscaler.make_url("")).rstrip("/"),
        "CONTAINER_ID": "3",
        "PUBLIC_IPADDR": "127.0.0.1",
        "VAST_TCP_PORT_3000": "1",  # the address KeyPair.auth_data signs by default
    }
    config = WorkerConfig.model_validate(
        {"model_server": {"base_url": model_server.url}, "routes": [{"path": "/echo"}], "perf": 10}
    )
    worker = compose_worker(config, Environment.from_env(environ))
    server = TestServer(worker.create_app(), host="127.0.0.1", **RUNNER_OPTIONS)
    await server.start_server()
    try:
        await wait_until(lambda: worker.status.ready)
        body = {"auth_data": keypair.auth_data(request_idx=71), "payload": {}}
        async with (
            aiohttp.ClientSession() as client,
            client.post(server.make_url("/session/create"), json=body) as response,
        ):
            assert response.status == 201
        await asyncio.wait_for(drain(worker.drainable, grace=5), 15)
        reported = [
            item["request_idx"]
            for path, sent in received
            if path == "/delete_requests/"
            for item in sent["requests"]
        ]
        assert reported == [71]
        last_status = [sent for path, sent in received if path == "/worker_status/"][-1]
        assert last_status["cur_load"] == 0 and last_status["num_requests_working"] == 0
    finally:
        await server.close()
        await autoscaler.close()


def test_the_grace_period_comes_from_pyworker_grace() -> None:
    assert Environment.from_env({}).grace_period == 30
    assert Environment.from_env({"PYWORKER_GRACE": "2.5"}).grace_period == 2.5
    for bad in ("soon", "-1", "nan", "inf"):
        with pytest.raises(InvalidEnvironment, match="PYWORKER_GRACE"):
            Environment.from_env({"PYWORKER_GRACE": bad})


async def test_hooks_that_hang_or_fail_are_bounded() -> None:
    ran: list[str] = []

    async def hangs() -> None:
        await asyncio.Event().wait()

    async def fails() -> None:
        raise ValueError("boom")

    async def works() -> None:
        ran.append("works")

    started = time.monotonic()
    await asyncio.wait_for(run_hooks([hangs, fails, works], timeout=0.2), 5)
    assert ran == ["works"] and time.monotonic() - started < 2


async def _status(worker: RunningWorker, path: str, body: Any) -> int:
    async with worker.post(path, body) as response:
        await response.read()
        status: int = response.status
        return status
