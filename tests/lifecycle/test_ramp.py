"""The ramp's arithmetic: which N it tries, how a window counts requests at its edges, the
latency limits; and its loop of senders shrinking to the chosen N to measure it again."""

from __future__ import annotations

import asyncio
import time

import pytest

from pyworker.config import JSONObject
from pyworker.lifecycle.closed_loop import ClosedLoop, Completion, Done, prorata
from pyworker.lifecycle.ramp import (
    RampSettings,
    Step,
    concurrency_steps,
    confirm,
    measure_step,
    over_latency_limit,
)


def test_doubles_up_to_the_ceiling_and_ends_on_it() -> None:
    assert list(concurrency_steps(1)) == [1]
    assert list(concurrency_steps(8)) == [1, 2, 4, 8]
    assert list(concurrency_steps(12)) == [1, 2, 4, 8, 12]
    # Twice an engine's declared 6: its own limit is a step too.
    assert list(concurrency_steps(12, declared=6)) == [1, 2, 4, 6, 8, 12]
    assert list(concurrency_steps(32, declared=16)) == [1, 2, 4, 8, 16, 32]


def test_a_window_counts_each_request_for_its_part_inside() -> None:
    records = [
        Completion(0.0, 2.0, 10.0),  # half inside [1, 3]: 5
        Completion(1.5, 2.5, 4.0),  # all inside: 4
        Completion(2.0, 6.0, 8.0),  # a quarter inside: 2
        Completion(3.0, 4.0, 100.0),  # after: nothing
        Completion(1.0, 2.0, None),  # failed: nothing
    ]
    assert prorata(records, 1.0, 3.0) == pytest.approx((5 + 4 + 2) / 2)


def test_back_to_back_windows_count_every_request_once() -> None:
    records = [Completion(start, start + 0.7, 7.0) for start in (0.0, 0.5, 1.1, 1.9, 2.4)]
    windows = [prorata(records, edge, edge + 1.0) for edge in (0.0, 1.0, 2.0, 3.0)]
    assert sum(windows) == pytest.approx(5 * 7.0)  # 1-second windows covering [0, 4]


def test_a_request_s_time_per_output_token_and_the_limits_in_words() -> None:
    assert Completion(1.0, 3.0, 50.0, output_tokens=40.0).per_token == pytest.approx(0.05)
    assert Completion(1.0, 3.0, 50.0).per_token is None  # the answer did not say
    assert Completion(1.0, 3.0, None, output_tokens=40.0).per_token is None  # failed
    settings = RampSettings(ceiling=8, deadline=0.0, latency_limit=2.0, token_latency_limit=0.05)
    step = Step(4, p90=1.5, p90_per_token=0.04)
    assert over_latency_limit(step, settings) == ""
    step.p90_per_token = 0.06
    assert over_latency_limit(step, settings) == (
        "p90 time per output token 0.06 s over the limit 0.05 s"
    )
    step.p90 = 2.5
    assert over_latency_limit(step, settings) == "p90 latency 2.5 s over the limit 2 s"


class Counting:
    """A server of 10 ms requests that counts how many are in flight."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.seen: list[int] = []

    async def send(self, payload: JSONObject) -> Done | None:
        self.in_flight += 1
        self.seen.append(self.in_flight)
        try:
            await asyncio.sleep(0.01)
        finally:
            self.in_flight -= 1
        return Done(1.0)


async def test_the_loop_shrinks_to_the_chosen_n_and_measures_it_again() -> None:
    server = Counting()
    loop = ClosedLoop(server.send, iter(lambda: {}, None))
    deadline = time.monotonic() + 30
    settings = RampSettings(ceiling=8, deadline=deadline)
    try:
        await measure_step(loop, 8, settings)
        assert max(server.seen) == 8
        chosen = Step(2, perf=1.0, windows=[1.0])
        confirmed = await confirm(loop, chosen, settings)
        assert confirmed is not None and confirmed.concurrency == 2 and confirmed.windows
        # Once the surplus senders' last requests ended, two were in flight, never more.
        assert server.seen[-20:] and max(server.seen[-20:]) == 2
        # 2 in flight of 10 ms requests: 200 a second, give or take a loaded machine's jitter.
        assert 50 < confirmed.perf <= 210
    finally:
        await loop.close()
    assert server.in_flight == 0


async def test_no_time_left_is_no_confirmation() -> None:
    loop = ClosedLoop(Counting().send, iter(lambda: {}, None))
    spent = RampSettings(ceiling=8, deadline=time.monotonic() - 1)
    assert await confirm(loop, Step(2, perf=1.0, windows=[1.0]), spent) is None
    assert await confirm(loop, None, RampSettings(ceiling=8, deadline=time.monotonic() + 5)) is None
    # 5 s left, and the step's requests took 2 s: its windows were 6 s, two of them do not fit.
    slow = Step(2, perf=1.0, p50=2.0, windows=[1.0])
    assert await confirm(loop, slow, RampSettings(ceiling=8, deadline=time.monotonic() + 5)) is None
    await loop.close()
