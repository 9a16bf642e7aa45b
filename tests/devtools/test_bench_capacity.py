"""bench/capacity.py, the closed-loop measurement that a worker's max_perf is held to.

Against a server with a known capacity (each request holds 0.1 s and reports 10 tokens, so N
in flight complete 100 N tokens/s at most), the loop keeps exactly N in flight and measures
close to that; the pro rata split of requests across window edges adds up.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bench.capacity import ClosedLoop, Completed, Target, concurrency_levels, summarize
from pyworker.protocol.usage import processed_tokens

HOLD = 0.1
TOKENS = 10  # 4 prompt + 6 completion


class Engine:
    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.in_flight = 0
        self.most_in_flight = 0
        self.bodies: list[dict[str, Any]] = []
        self.answered: list[float] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.json())
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(HOLD)
        finally:
            self.in_flight -= 1
        self.answered.append(time.monotonic())
        usage = {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": TOKENS}
        return web.json_response({"choices": [], "usage": usage}, status=self.status)


@pytest.fixture
async def engine() -> AsyncIterator[tuple[Engine, str]]:
    fake = Engine()
    app = web.Application()
    app.router.add_post("/v1/completions", fake.handle)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield fake, str(server.make_url("/v1/completions"))
    finally:
        await server.close()


def target(url: str) -> Target:
    return Target(
        url=url,
        payloads=[{"prompt": "a", "max_tokens": 6}, {"prompt": "b", "max_tokens": 6}],
        envelope=lambda payload: {"auth_data": {"signature": "s"}, "payload": payload},
        produced=processed_tokens,
        requested=lambda payload: 20.0,
        timeout=10.0,
    )


@pytest.mark.parametrize("in_flight", [1, 4])
async def test_n_in_flight_complete_what_the_server_can(
    engine: tuple[Engine, str], in_flight: int
) -> None:
    fake, url = engine
    async with aiohttp.ClientSession() as session:
        step = await ClosedLoop(target(url), session).step(in_flight, 0.3, 0.5, windows=2)
    ceiling = in_flight * TOKENS / HOLD
    assert fake.most_in_flight == in_flight
    assert 0.5 * ceiling <= step.produced <= ceiling * 1.001  # slower on a loaded machine
    # What the server answered inside the windows: the same, but for the requests that
    # straddle an edge (one per lane per edge), which the pro rata split counts in part.
    seconds = step.ended - step.started
    answered = sum(1 for moment in fake.answered if step.started <= moment < step.ended)
    assert abs(step.produced * seconds - answered * TOKENS) <= 2 * in_flight * TOKENS
    assert step.requested == pytest.approx(step.produced * 2)  # 20 charged for 10 produced
    assert len(step.windows) == 2 and step.failures == 0 and step.missing_usage == 0
    first = {"auth_data": {"signature": "s"}, "payload": {"prompt": "a", "max_tokens": 6}}
    assert fake.bodies[0] == first
    assert fake.bodies[1]["payload"]["prompt"] == "b"  # the payloads in turn


async def test_refused_requests_are_failures_not_work(engine: tuple[Engine, str]) -> None:
    fake, url = engine
    fake.status = 429
    async with aiohttp.ClientSession() as session:
        step = await ClosedLoop(target(url), session).step(2, 0.1, 0.4)
    assert step.produced == 0 and step.failures > 0


def test_requests_spanning_window_edges_count_pro_rata() -> None:
    records = [
        Completed(started=0.0, ended=2.0, produced=10.0, requested=10.0),  # half in [1, 3)
        Completed(started=1.5, ended=2.5, produced=4.0, requested=8.0),  # all inside
        Completed(started=2.0, ended=6.0, produced=8.0, requested=8.0),  # a quarter inside
        Completed(started=3.0, ended=4.0, produced=100.0, requested=100.0),  # after
    ]
    step = summarize(2, records, [], [], start=1.0, window=1.0, windows=2)
    assert step.windows == pytest.approx([5 + 2, 2 + 2])  # [1, 2) and [2, 3)
    assert step.produced == pytest.approx((5 + 4 + 2) / 2)  # the two windows' mean
    assert step.requested == pytest.approx((5 + 8 + 2) / 2)
    assert step.requests == pytest.approx((0.5 + 1 + 0.25) / 2)
    assert step.latency_p50 == pytest.approx(1.0)  # of the requests that ended inside

    three = summarize(2, records, [], [], start=0.0, window=2.0, windows=3)
    assert three.windows == pytest.approx([(10 + 2) / 2, (2 + 4 + 100) / 2, 4 / 2])
    assert three.produced == pytest.approx(6.0)  # the median: one busy window does not count


def test_levels_double_up_to_the_ceiling() -> None:
    assert concurrency_levels(8) == [1, 2, 4, 8]
    assert concurrency_levels(32) == [1, 2, 4, 8, 16, 32]
    assert concurrency_levels(12) == [1, 2, 4, 8, 12]
    assert concurrency_levels(1) == [1]


async def test_a_sweep_measures_its_best_in_flight_again(engine: tuple[Engine, str]) -> None:
    fake, url = engine
    async with aiohttp.ClientSession() as session:
        loop = ClosedLoop(target(url), session)
        once = await loop.sweep([1, 2], 0.1, 0.3)
        sweep = await loop.sweep([1, 2], 0.1, 0.3, again=3)
    assert once.again is None and once.sustained is once.best
    assert sweep.best.in_flight == 2  # 200 tokens/s at most against 100
    assert sweep.again is not None and sweep.sustained is sweep.again
    assert sweep.again.in_flight == 2 and len(sweep.again.windows) == 3
    assert sweep.again.started > sweep.steps[-1].ended  # a fresh measurement, after the sweep
    assert fake.most_in_flight == 2
