"""Reports and the public key against autoscalers that redirect, flood or fail.

Reports carry MASTER_TOKEN: a redirect is never followed, whatever its kind, and the report is
sent again to the next REPORT_ADDR, where it counts once; an answer that never ends is cut at
a bound and the worker keeps reporting. A worker that cannot get the public key says so in
`error_msg`, and recovers when the key comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from pyworker.config import WorkerConfig
from pyworker.config.environment import Environment
from pyworker.lifecycle import public_key
from pyworker.lifecycle.accounting import Ledger, Outcome
from pyworker.lifecycle.reporter import Reporter
from pyworker.lifecycle.state import WorkerState, WorkerStatus
from pyworker.serving.compose import compose_worker
from pyworker.serving.http_errors import JsonErrorRunner
from pyworker.serving.server import RUNNER_OPTIONS
from tests.conftest import KeyPair, ModelServer, wait_until
from tests.support.fake_autoscaler import FakeAutoscaler
from tests.support.recording_host import HostFactory, endless, redirect_to
from tests.support.states import advance

TOKEN = "untrusted-autoscaler-token"


async def answer_ok(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


def make_reporter(*addresses: str) -> tuple[Reporter, WorkerStatus, Ledger]:
    environment = Environment.from_env(
        {"CONTAINER_ID": "3", "REPORT_ADDR": ",".join(addresses), "MASTER_TOKEN": TOKEN}
    )
    status, ledger = WorkerStatus(), Ledger()
    reporter = Reporter(
        environment,
        status,
        ledger,
        lambda: "http://127.0.0.1:1",
        busy_interval=0.02,
        idle_interval=0.1,
        attempt_timeout=5.0,
    )
    return reporter, status, ledger


@contextlib.asynccontextmanager
async def running(reporter: Reporter) -> AsyncIterator[None]:
    task = asyncio.create_task(reporter.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def deleted(autoscaler: FakeAutoscaler) -> list[int]:
    return [item["request_idx"] for body in autoscaler.delete_requests for item in body["requests"]]


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_a_redirected_report_is_sent_to_the_next_address_never_where_it_points(
    hosts: HostFactory, status: int
) -> None:
    elsewhere = await hosts(answer_ok)  # another host that would answer 200 to anything
    redirector = await hosts(redirect_to(lambda: elsewhere.url, status))
    async with FakeAutoscaler() as backup:
        reporter, worker_status, ledger = make_reporter(redirector.url, backup.url)
        async with running(reporter):
            advance(worker_status, WorkerState.READY)
            ledger.finish(ledger.receive(41, "/r", 10.0), Outcome.SUCCESS, 200)
            await wait_until(lambda: deleted(backup) == [41])
            await backup.wait_report(lambda report: report["num_requests_recieved"] == 1)
    assert elsewhere.requests == []  # MASTER_TOKEN never left the listed addresses
    assert {path for _, path, _, _ in redirector.requests} == {
        "/worker_status/",
        "/delete_requests/",
    }
    reports = backup.worker_status
    assert all(report["mtoken"] == TOKEN for report in reports)
    # The redirected reports were not delivered: their deltas arrived once, at the backup.
    assert sum(report["num_requests_recieved"] for report in reports) == 1
    assert sum(report["new_load"] for report in reports) == 10.0


async def test_an_endless_answer_is_cut_at_the_bound_and_reporting_goes_on(
    hosts: HostFactory,
) -> None:
    sent: list[int] = []
    bodies: list[dict[str, Any]] = []
    flood = endless(sent)

    async def record_then_flood(request: web.Request) -> web.StreamResponse:
        bodies.append(json.loads(await request.read()))
        return await flood(request)

    autoscaler = await hosts(record_then_flood)
    reporter, worker_status, ledger = make_reporter(autoscaler.url)
    async with running(reporter):
        advance(worker_status, WorkerState.READY)
        ledger.finish(ledger.receive(42, "/r", 10.0), Outcome.SUCCESS, 200)
        await wait_until(lambda: reporter.sent_reports >= 3 and not ledger.finished_waiting)
    assert reporter.failed_reports == 0 and reporter.failed_deletes == 0
    assert [item["request_idx"] for body in bodies for item in body.get("requests", [])] == [42]
    await wait_until(lambda: len(sent) >= 3)
    assert max(sent) < 16 * 1024 * 1024  # each answer left at the bound, not read on


async def test_a_worker_without_the_public_key_says_so_then_recovers_when_it_comes(
    keypair: KeyPair, model_server: ModelServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(public_key, "KEY_MAX_DELAY", 0.2)
    config = WorkerConfig.model_validate(
        {"model_server": {"base_url": model_server.url}, "routes": [{"path": "/echo"}], "perf": 50}
    )
    async with FakeAutoscaler(b"not a key") as autoscaler:
        environment = Environment.from_env(
            {
                "REPORT_ADDR": autoscaler.url,
                "CONTAINER_ID": "9",
                "UNSECURED": "false",
                "MASTER_TOKEN": TOKEN,
                "PYWORKER_REPORT_INTERVAL": "0.05",
            }
        )
        worker = compose_worker(config, environment)
        runner = JsonErrorRunner(worker.create_app(), **RUNNER_OPTIONS)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = runner.addresses[0][1]
            worker.public_url.value = environment.public_url(port)
            failing = await autoscaler.wait_report(
                lambda report: "public key unavailable" in report["error_msg"]
            )
            assert f"{autoscaler.url}/pubkey/" in failing["error_msg"]
            assert failing["max_perf"] == 0 and worker.status.state is WorkerState.ERRORED
            seen = len(autoscaler.worker_status)
            autoscaler.pem = keypair.pem
            ready = await autoscaler.wait_report(
                lambda report: report["max_perf"] == 50, after=seen
            )
            assert ready["error_msg"] == "" and worker.status.ready
            url = worker.url
            body = {"auth_data": keypair.auth_data(url), "payload": {"prompt": "hi"}}
            async with (
                aiohttp.ClientSession() as session,
                session.post(f"http://127.0.0.1:{port}/echo", json=body) as response,
            ):
                assert response.status == 200, await response.text()
        finally:
            await runner.cleanup()
