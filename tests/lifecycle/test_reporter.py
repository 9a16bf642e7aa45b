"""The reporter against a recording autoscaler on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from pyworker.config.environment import Environment
from pyworker.lifecycle.accounting import Ledger, Outcome
from pyworker.lifecycle.reporter import Reporter
from pyworker.lifecycle.state import WorkerState, WorkerStatus
from pyworker.protocol.messages import DELETE_REQUESTS_PATH, STATUS_PATH
from tests.conftest import wait_until
from tests.support.states import advance

STATUS_FIELDS = {
    "id", "mtoken", "version", "loadtime", "cur_load", "new_load", "rej_load", "cur_perf",
    "max_perf", "error_msg", "num_requests_working", "num_requests_recieved",
    "additional_disk_usage", "working_request_idxs", "cur_capacity", "max_capacity", "url",
}  # fmt: skip
TOKEN = "very-secret-master-token"


class Autoscaler:
    def __init__(self) -> None:
        self.statuses: list[dict[str, Any]] = []
        self.finished: list[dict[str, Any]] = []
        self.up = True
        self.server: TestServer | None = None

    def app(self) -> web.Application:
        async def status(request: web.Request) -> web.Response:
            if not self.up:
                return web.Response(status=503)
            self.statuses.append(await request.json())
            return web.json_response({})

        async def delete(request: web.Request) -> web.Response:
            if not self.up:
                return web.Response(status=503)
            self.finished.append(await request.json())
            return web.json_response({})

        app = web.Application()
        app.router.add_post(STATUS_PATH, status)
        app.router.add_post(DELETE_REQUESTS_PATH, delete)
        return app

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    def finished_idxs(self) -> list[int]:
        return [item["request_idx"] for body in self.finished for item in body["requests"]]


@pytest.fixture
async def autoscaler() -> AsyncIterator[Autoscaler]:
    recorder = Autoscaler()
    recorder.server = TestServer(recorder.app(), host="127.0.0.1")
    await recorder.server.start_server()
    yield recorder
    await recorder.server.close()


@contextlib.asynccontextmanager
async def running(reporter: Reporter) -> AsyncIterator[Reporter]:
    task = asyncio.create_task(reporter.run())
    try:
        yield reporter
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def make_reporter(*addresses: str) -> tuple[Reporter, WorkerStatus, Ledger]:
    environment = Environment.from_env(
        {"CONTAINER_ID": "17", "MASTER_TOKEN": TOKEN, "REPORT_ADDR": ",".join(addresses)}
    )
    status, ledger = WorkerStatus(), Ledger()
    reporter = Reporter(
        environment,
        status,
        ledger,
        lambda: "http://1.2.3.4:5",
        busy_interval=0.05,
        idle_interval=0.5,
        attempt_timeout=1.0,
        attempts_per_address=1,
    )
    return reporter, status, ledger


async def test_reports_while_loading_then_ready_at_once(autoscaler: Autoscaler) -> None:
    reporter, status, _ = make_reporter(autoscaler.url)
    async with running(reporter):
        advance(status, WorkerState.LOADING)
        await wait_until(lambda: len(autoscaler.statuses) >= 1)
        first = autoscaler.statuses[0]
        assert set(first) == STATUS_FIELDS
        assert first["id"] == 17 and first["mtoken"] == TOKEN and first["url"] == "http://1.2.3.4:5"
        assert first["loadtime"] == 0.0 and first["max_perf"] == 0.0
        # Idle: still reported, at most idle_interval apart.
        count = len(autoscaler.statuses)
        await wait_until(lambda: len(autoscaler.statuses) > count, timeout=2)

        status.set_perf(42.0)
        advance(status, WorkerState.READY)
        became_ready = time.monotonic()
        await wait_until(lambda: autoscaler.statuses[-1]["max_perf"] == 42.0, timeout=1.0)
        assert time.monotonic() - became_ready < 1.0
        ready = autoscaler.statuses[-1]
        assert ready["loadtime"] > 0 and ready["error_msg"] == ""


async def test_counters_and_finished_requests_survive_an_outage(autoscaler: Autoscaler) -> None:
    reporter, status, ledger = make_reporter(autoscaler.url)
    async with running(reporter):
        advance(status, WorkerState.READY)
        await wait_until(lambda: len(autoscaler.statuses) >= 1)
        autoscaler.up = False
        records = [ledger.receive(n, "/r", 10) for n in range(5)]
        for record in records[:4]:
            ledger.finish(record, Outcome.SUCCESS, 200)
        ledger.reject(99, "/r", 3, 429)
        await wait_until(lambda: reporter.failed_reports >= 2)
        sent_before = len(autoscaler.statuses)
        autoscaler.up = True
        await wait_until(lambda: len(autoscaler.finished_idxs()) == 5)
        await wait_until(lambda: len(autoscaler.statuses) > sent_before)
    after = autoscaler.statuses[sent_before:]
    assert sum(s["new_load"] for s in after) == 50
    assert sum(s["cur_perf"] for s in after) == 40
    assert sum(s["rej_load"] for s in after) == 3
    assert sum(s["num_requests_recieved"] for s in after) == 6
    assert after[-1]["working_request_idxs"] == [4] and after[-1]["cur_load"] == 10
    assert sorted(autoscaler.finished_idxs()) == [0, 1, 2, 3, 99]
    body = autoscaler.finished[0]
    assert body["worker_id"] == 17 and body["mtoken"] == TOKEN
    item = body["requests"][0]
    assert set(item) == {
        "request_idx", "success", "status", "entered_queue_at", "work_started_at",
        "work_completed_at",
    }  # fmt: skip
    statuses = {i["request_idx"]: i["status"] for b in autoscaler.finished for i in b["requests"]}
    assert statuses[99] == "Rejected" and statuses[0] == "Success"


async def test_fails_over_to_the_next_address(autoscaler: Autoscaler, refused_port: int) -> None:
    reporter, status, ledger = make_reporter(f"http://127.0.0.1:{refused_port}", autoscaler.url)
    async with running(reporter):
        ledger.finish(ledger.receive(1, "/r", 1), Outcome.ERROR, 500)
        advance(status, WorkerState.LOADING)
        await wait_until(lambda: len(autoscaler.statuses) >= 1 and bool(autoscaler.finished_idxs()))
    assert autoscaler.finished_idxs() == [1]


async def test_the_master_token_never_reaches_the_logs(
    autoscaler: Autoscaler, caplog: pytest.LogCaptureFixture, refused_port: int
) -> None:
    caplog.set_level(logging.DEBUG)
    reporter, status, _ = make_reporter(f"http://127.0.0.1:{refused_port}", autoscaler.url)
    async with running(reporter):
        advance(status, WorkerState.LOADING)
        await wait_until(lambda: len(autoscaler.statuses) >= 1)
        autoscaler.up = False
        await wait_until(lambda: reporter.failed_reports >= 1)
    assert caplog.records, "the failures should have been logged"
    assert TOKEN not in caplog.text
    assert reporter.last_report is not None and "mtoken" not in reporter.last_report


async def test_without_report_addresses_it_does_nothing() -> None:
    status, ledger = WorkerStatus(), Ledger()
    reporter = Reporter(Environment.from_env({}), status, ledger, lambda: "")
    await asyncio.wait_for(reporter.run(), 1)
    assert reporter.sent_reports == 0
