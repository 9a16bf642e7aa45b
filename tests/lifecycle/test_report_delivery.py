"""Reports are counted once, against slow, failing and lying autoscalers (docs/reporting.md).

The autoscaler adds up the deltas of `/worker_status/` (`new_load`, `cur_perf`, `rej_load`,
`num_requests_recieved`): each must be counted at most once, and an outage may lose at most
the one report in flight when it began. `/delete_requests/` is retried until acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from enum import Enum
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

TIMEOUT = 0.3
DELTAS = ("new_load", "cur_perf", "rej_load", "num_requests_recieved")


class Behaviour(Enum):
    ANSWER = "answer"
    LATE = "records, then answers after the worker's timeout"
    LYING_500 = "records, then answers 500"
    FAILING_500 = "answers 500 without recording"
    HANG = "records, then never answers"
    UNAVAILABLE = "answers 503 without recording"


class Autoscaler:
    """Records every body it is sent; `counted` holds what it took into account."""

    def __init__(self) -> None:
        self.behaviour = Behaviour.ANSWER
        self.seen: list[dict[str, Any]] = []
        self.counted: list[dict[str, Any]] = []
        self.deleted: list[int] = []
        self.acknowledged_deleted: list[int] = []
        """request_idx in the `/delete_requests/` the autoscaler answered 200 in time."""
        self.in_flight = 0
        self.peak_in_flight = 0
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.delay = 0.0
        self.server = TestServer(self._app(), host="127.0.0.1")

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    def total(self, field: str) -> float:
        return float(sum(report[field] for report in self.counted))

    def _app(self) -> web.Application:
        async def status(request: web.Request) -> web.Response:
            body = await request.json()
            self.seen.append(body)
            return await self._answer(body, self.counted, track=True)

        async def delete(request: web.Request) -> web.Response:
            body = await request.json()
            idxs = [item["request_idx"] for item in body["requests"]]
            return await self._answer(idxs, self.deleted, track=False)

        app = web.Application()
        app.router.add_post(STATUS_PATH, status)
        app.router.add_post(DELETE_REQUESTS_PATH, delete)
        return app

    async def _answer(self, item: Any, into: list[Any], track: bool) -> web.Response:
        """Behave as told; `track`: count status reports in flight at once."""
        behaviour = self.behaviour
        self.in_flight += track
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        if track:
            self.entered.set()
        try:
            if behaviour in (Behaviour.FAILING_500, Behaviour.UNAVAILABLE):
                return web.Response(status=500 if behaviour is Behaviour.FAILING_500 else 503)
            if isinstance(item, list):
                into.extend(item)
            else:
                into.append(item)
            if behaviour is Behaviour.LATE:
                await asyncio.sleep(TIMEOUT * 3)
            elif behaviour is Behaviour.HANG:
                await self.release.wait()
            elif behaviour is Behaviour.LYING_500:
                return web.Response(status=500)
            elif self.delay:
                await asyncio.sleep(self.delay)
            if not track:
                self.acknowledged_deleted.extend(item)
            return web.json_response({})
        finally:
            self.in_flight -= track


@pytest.fixture
async def autoscaler() -> AsyncIterator[Autoscaler]:
    recorder = Autoscaler()
    await recorder.server.start_server()
    yield recorder
    recorder.release.set()
    await recorder.server.close()


def make_reporter(url: str, timeout: float = TIMEOUT) -> tuple[Reporter, WorkerStatus, Ledger]:
    environment = Environment.from_env({"CONTAINER_ID": "3", "REPORT_ADDR": url})
    status, ledger = WorkerStatus(), Ledger()
    reporter = Reporter(
        environment,
        status,
        ledger,
        lambda: "http://127.0.0.1:1",
        busy_interval=0.02,
        idle_interval=0.1,
        attempt_timeout=timeout,
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


async def serve_requests(ledger: Ledger, first_idx: int, count: int, load: float = 10) -> None:
    """`count` requests received and served, a report interval or so apart."""
    for idx in range(first_idx, first_idx + count):
        ledger.finish(ledger.receive(idx, "/r", load), Outcome.SUCCESS, 200)
        await asyncio.sleep(0.03)


@pytest.mark.parametrize("behaviour", [Behaviour.LATE, Behaviour.LYING_500])
async def test_an_autoscaler_that_records_then_fails_counts_each_delta_once(
    autoscaler: Autoscaler, behaviour: Behaviour
) -> None:
    reporter, status, ledger = make_reporter(autoscaler.url)
    async with running(reporter):
        advance(status, WorkerState.READY)
        await wait_until(lambda: len(autoscaler.counted) >= 1)
        autoscaler.behaviour = behaviour
        await serve_requests(ledger, 1, 5)
        await wait_until(lambda: reporter.failed_reports >= 3)
        autoscaler.behaviour = Behaviour.ANSWER
        await wait_until(lambda: sorted(set(autoscaler.acknowledged_deleted)) == [1, 2, 3, 4, 5])
        sent = reporter.sent_reports
        await wait_until(lambda: reporter.sent_reports >= sent + 2)
    # Every interval the autoscaler recorded counts once: never twice, here none lost.
    assert autoscaler.total("new_load") == 50 and autoscaler.total("cur_perf") == 50
    assert autoscaler.total("num_requests_recieved") == 5
    assert autoscaler.peak_in_flight == 1
    # Finished requests were repeated until acknowledged, never after.
    assert sorted(autoscaler.acknowledged_deleted) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("behaviour", [Behaviour.FAILING_500, Behaviour.HANG])
async def test_an_outage_loses_at_most_the_report_in_flight(
    autoscaler: Autoscaler, behaviour: Behaviour
) -> None:
    reporter, status, ledger = make_reporter(autoscaler.url)
    async with running(reporter):
        advance(status, WorkerState.READY)
        await wait_until(lambda: len(autoscaler.counted) >= 1)
        autoscaler.behaviour = behaviour
        seen_before = len(autoscaler.seen)
        await serve_requests(ledger, 1, 6)
        await wait_until(lambda: reporter.failed_reports >= 3)
        autoscaler.behaviour = Behaviour.ANSWER
        autoscaler.release.set()
        await wait_until(lambda: sorted(set(autoscaler.acknowledged_deleted)) == [1, 2, 3, 4, 5, 6])
        await wait_until(lambda: autoscaler.total("new_load") + lost(autoscaler) >= 60)
    uncounted = [r for r in autoscaler.seen[seen_before:] if r not in autoscaler.counted]
    if behaviour is Behaviour.HANG:
        uncounted = []  # a hanging autoscaler recorded its reports: nothing was lost
    with_deltas = [r for r in uncounted if any(r[field] for field in DELTAS)]
    assert len(with_deltas) <= 1, "an outage lost more than the one report in flight"
    assert autoscaler.total("new_load") + sum(r["new_load"] for r in with_deltas) == 60
    assert autoscaler.total("cur_perf") + sum(r["cur_perf"] for r in with_deltas) == 60
    assert autoscaler.peak_in_flight == 1


def lost(autoscaler: Autoscaler) -> float:
    counted = autoscaler.counted
    return float(sum(r["new_load"] for r in autoscaler.seen if r not in counted))


async def test_an_unavailable_autoscaler_loses_nothing(autoscaler: Autoscaler) -> None:
    reporter, status, ledger = make_reporter(autoscaler.url)
    async with running(reporter):
        advance(status, WorkerState.READY)
        await wait_until(lambda: len(autoscaler.counted) >= 1)
        autoscaler.behaviour = Behaviour.UNAVAILABLE
        await serve_requests(ledger, 1, 4)
        ledger.reject(9, "/r", 3, 429)
        failed = reporter.failed_reports
        # The rejection itself meets the outage: at least one report carrying it fails.
        await wait_until(lambda: reporter.failed_reports >= max(failed + 1, 3))
        autoscaler.behaviour = Behaviour.ANSWER
        # A report taken before the rejection may be the first one counted: wait for all.
        await wait_until(lambda: all_counted(autoscaler, load=40, rejected=3, received=5))
        await wait_until(lambda: sorted(set(autoscaler.acknowledged_deleted)) == [1, 2, 3, 4, 9])
    # Counted once each, never twice.
    assert autoscaler.total("new_load") == 40 and autoscaler.total("cur_perf") == 40
    assert autoscaler.total("rej_load") == 3
    assert autoscaler.total("num_requests_recieved") == 5


def all_counted(autoscaler: Autoscaler, load: float, rejected: float, received: int) -> bool:
    return (
        autoscaler.total("new_load") >= load
        and autoscaler.total("rej_load") >= rejected
        and autoscaler.total("num_requests_recieved") >= received
    )


async def test_the_final_report_waits_for_the_one_in_flight_and_counts_once(
    autoscaler: Autoscaler,
) -> None:
    reporter, status, ledger = make_reporter(autoscaler.url, timeout=10.0)
    autoscaler.delay = 0.15  # slow, but well within the worker's timeout
    async with running(reporter):
        advance(status, WorkerState.READY)
        await wait_until(lambda: len(autoscaler.counted) >= 1)
        for round_number in range(5):
            record = ledger.receive(round_number, "/r", 7)
            autoscaler.entered.clear()
            status.set_perf(float(round_number + 1))  # a change: a periodic report at once
            await asyncio.wait_for(autoscaler.entered.wait(), 5)
            ledger.finish(record, Outcome.SUCCESS, 200)
            advance(status, WorkerState.DRAINING)
            await reporter.final_report()  # races the periodic report in flight
            assert autoscaler.total("new_load") == 7 * (round_number + 1)
            assert autoscaler.total("cur_perf") == 7 * (round_number + 1)
    assert autoscaler.peak_in_flight == 1
    assert sorted(autoscaler.deleted) == sorted(autoscaler.acknowledged_deleted) == [0, 1, 2, 3, 4]
    assert min(report["cur_load"] for report in autoscaler.counted) >= 0
