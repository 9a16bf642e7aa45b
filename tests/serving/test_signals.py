"""Signals a real `pyworker run` process gets: SIGHUP drains as SIGTERM does; SIGQUIT, SIGUSR1
and SIGUSR2 are ignored (pyworker.serving.signals, docs/supervision.md).

Each test holds a stream open at the model server, signals the worker, and checks what the
client gets (the whole stream, 503 or 200 for a new request), what the model server got, what
the autoscaler was told (the stream's request_idx reported done, a last report with nothing
working), and how the process ends.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.conftest import KeyPair, ModelServer, wait_until
from tests.serving.test_drain import (
    HELD_STREAM,
    REST_OF_STREAM,
    WorkerProcess,
    start_process,  # noqa: F401  (the fixture)
)
from tests.support.fake_autoscaler import FakeAutoscaler

STREAM_IDX = 501
EXIT_TIMEOUT = 15.0


@pytest.fixture
async def autoscaler(keypair: KeyPair) -> AsyncIterator[FakeAutoscaler]:
    async with FakeAutoscaler(keypair.pem) as fake:
        yield fake


@pytest.fixture
async def worker(start_process: Any, autoscaler: FakeAutoscaler) -> WorkerProcess:  # noqa: F811
    """A worker that checks signatures and reports to `autoscaler` every 50 ms."""
    process: WorkerProcess = await start_process(
        REPORT_ADDR=autoscaler.url,
        CONTAINER_ID="9",
        UNSECURED="false",
        MASTER_TOKEN="signals-token",
        PUBLIC_IPADDR="127.0.0.1",
        PYWORKER_REPORT_INTERVAL="0.05",
        PYWORKER_GRACE="60",
    )
    return process


def public_url(worker: WorkerProcess) -> str:
    """The address the worker's signatures must name (PUBLIC_IPADDR and its bound port)."""
    return "http://127.0.0.1:" + worker.url.rsplit(":", 1)[1]


async def echo_status(
    client: aiohttp.ClientSession, worker: WorkerProcess, keypair: KeyPair, request_idx: int = 1
) -> int:
    """A valid request (signed for this worker's address) to /echo; its status."""
    auth = keypair.auth_data(url=public_url(worker), request_idx=request_idx)
    async with client.post(worker.url + "/echo", json={"auth_data": auth, "payload": {}}) as answer:
        await answer.read()
        return answer.status


async def wait_for_status(
    client: aiohttp.ClientSession, worker: WorkerProcess, keypair: KeyPair, wanted: int
) -> None:
    deadline = time.monotonic() + 15
    while (status := await echo_status(client, worker, keypair)) != wanted:
        assert time.monotonic() < deadline, f"answered {status}, never {wanted}"
        await asyncio.sleep(0.02)


def reported_done(autoscaler: FakeAutoscaler) -> list[int]:
    return [item["request_idx"] for body in autoscaler.delete_requests for item in body["requests"]]


async def open_stream(
    client: aiohttp.ClientSession, worker: WorkerProcess, keypair: KeyPair
) -> aiohttp.ClientResponse:
    """A stream whose first chunk arrived; the model server holds the rest until released."""
    await wait_for_status(client, worker, keypair, 200)
    auth = keypair.auth_data(url=public_url(worker), request_idx=STREAM_IDX)
    stream = await client.post(
        worker.url + "/stream", json={"auth_data": auth, "payload": HELD_STREAM}
    )
    assert stream.status == 200
    assert await stream.content.readuntil(b"\n\n") == b"data: 0\n\n"
    return stream


@pytest.mark.parametrize(
    "signals",
    [
        [signal.SIGHUP],
        [signal.SIGHUP, signal.SIGTERM],  # a closed session, then its supervisor
        [signal.SIGTERM, signal.SIGHUP],  # systemd's SendSIGHUP
        [signal.SIGHUP, signal.SIGHUP],
    ],
    ids=lambda signals: "-".join(signum.name for signum in signals),
)
async def test_sighup_drains_a_stream_to_its_end_reports_it_and_exits_0(
    worker: WorkerProcess,
    model_server: ModelServer,
    autoscaler: FakeAutoscaler,
    keypair: KeyPair,
    signals: list[signal.Signals],
) -> None:
    async with aiohttp.ClientSession() as client:
        stream = await open_stream(client, worker, keypair)
        async with stream:
            for signum in signals:
                worker.process.send_signal(signum)
            await wait_for_status(client, worker, keypair, 503)  # draining
            await autoscaler.wait_report(lambda report: report["num_requests_working"] == 1)
            assert worker.process.returncode is None
            model_server.recorder.release.set()
            assert await asyncio.wait_for(stream.content.read(), 10) == REST_OF_STREAM
    assert await asyncio.wait_for(worker.process.wait(), EXIT_TIMEOUT) == 0
    # The model server ran the stream to its end; the autoscaler was told it finished, and
    # the last report has nothing left working.
    assert model_server.recorder.payloads.count(HELD_STREAM) == 1
    assert model_server.recorder.disconnects == 0
    assert reported_done(autoscaler).count(STREAM_IDX) == 1
    last = autoscaler.worker_status[-1]
    assert last["num_requests_working"] == 0 and last["cur_load"] == 0
    assert not autoscaler.invalid


@pytest.mark.parametrize(
    "signum", [signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2], ids=lambda signum: signum.name
)
async def test_sigquit_and_sigusr_leave_the_worker_serving(
    worker: WorkerProcess,
    model_server: ModelServer,
    autoscaler: FakeAutoscaler,
    keypair: KeyPair,
    signum: signal.Signals,
) -> None:
    async with aiohttp.ClientSession() as client:
        stream = await open_stream(client, worker, keypair)
        async with stream:
            for _ in range(2):  # twice: no "second signal" either
                worker.process.send_signal(signum)
            # Still serving: a new request is answered, the held stream still runs.
            assert await echo_status(client, worker, keypair, 502) == 200
            reports = len(autoscaler.worker_status)
            assert (await client.get(worker.url + "/health")).status == 200
            model_server.recorder.release.set()
            assert await asyncio.wait_for(stream.content.read(), 10) == REST_OF_STREAM
        await wait_until(lambda: STREAM_IDX in reported_done(autoscaler))
        await autoscaler.wait_report(
            lambda report: report["num_requests_working"] == 0, after=reports
        )
        assert worker.process.returncode is None
        assert await echo_status(client, worker, keypair, 502) == 200
    worker.process.send_signal(signal.SIGTERM)  # and it still drains and exits as it should
    assert await asyncio.wait_for(worker.process.wait(), EXIT_TIMEOUT) == 0
    assert reported_done(autoscaler).count(STREAM_IDX) == 1
    assert not autoscaler.invalid
