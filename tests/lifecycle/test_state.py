"""The worker's state machine: which moves it allows, and who is woken when it changes."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from pyworker.lifecycle.state import (
    TRANSITIONS,
    IllegalTransition,
    WorkerState,
    WorkerStatus,
    is_legal,
)
from tests.support.states import advance

STARTING, LOADING, BENCHMARKING, READY, ERRORED, DRAINING = WorkerState
LIVE = [state for state in WorkerState if state is not DRAINING]
LEGAL = [(source, target) for source in WorkerState for target in TRANSITIONS[source]]
ILLEGAL = [
    (source, target)
    for source, target in itertools.permutations(LIVE, 2)
    if target not in TRANSITIONS[source]
]


@pytest.fixture(autouse=True)
def illegal_transitions() -> None:
    """This module makes illegal moves on purpose (the suite's guard is off here)."""


def status_in(state: WorkerState) -> WorkerStatus:
    status = WorkerStatus()
    advance(status, state)
    assert status.state is state
    return status


# --- the table ----------------------------------------------------------------------------
def test_the_table_is_the_documented_one() -> None:
    allowed = {source: set(targets) for source, targets in TRANSITIONS.items()}
    assert allowed == {
        STARTING: {LOADING, ERRORED, DRAINING},
        LOADING: {BENCHMARKING, ERRORED, DRAINING},
        BENCHMARKING: {READY, ERRORED, DRAINING},
        READY: {LOADING, ERRORED, DRAINING},
        ERRORED: {LOADING, DRAINING},
        DRAINING: set(),
    }
    assert all(reason for targets in TRANSITIONS.values() for reason in targets.values())


def test_every_live_state_can_report_an_error_and_drain() -> None:
    """What makes raising safe: the handlers an illegal move reaches can always move on."""
    for state in LIVE:
        assert DRAINING in TRANSITIONS[state]
        assert state is ERRORED or ERRORED in TRANSITIONS[state]


@pytest.mark.parametrize(("source", "target"), LEGAL)
def test_every_legal_move_is_made_and_wakes(source: WorkerState, target: WorkerState) -> None:
    status = status_in(source)
    version = status.version
    status.set_state(target)
    assert status.state is target and status.version == version + 1
    assert is_legal(source, target)


@pytest.mark.parametrize(("source", "target"), ILLEGAL)
def test_every_illegal_move_raises_and_changes_nothing(
    source: WorkerState, target: WorkerState
) -> None:
    status = status_in(source)
    before = (status.state, status.error_msg, status.version, status.loadtime)
    with pytest.raises(IllegalTransition) as raised:
        status.set_state(target, "some error")
    assert (raised.value.source, raised.value.target) == (source, target)
    assert (status.state, status.error_msg, status.version, status.loadtime) == before
    assert not is_legal(source, target)


@pytest.mark.parametrize("target", LIVE)
def test_draining_is_final_and_late_updates_are_ignored(target: WorkerState) -> None:
    status = status_in(READY)
    status.set_state(DRAINING)
    version = status.version
    status.set_state(target)  # readiness keeps running while the worker drains: no error
    assert status.state is DRAINING and status.version == version


def test_an_error_while_draining_is_still_recorded() -> None:
    status = status_in(READY)
    status.set_state(DRAINING)
    status.set_state(ERRORED, "model server error: killed")
    assert status.state is DRAINING and status.error_msg == "model server error: killed"


@pytest.mark.parametrize(
    "moves",
    [
        pytest.param([LOADING, BENCHMARKING, READY], id="first start"),
        pytest.param([ERRORED], id="GPU check fails"),
        pytest.param(
            [LOADING, ERRORED, LOADING, BENCHMARKING, READY], id="load deadline, late load"
        ),
        pytest.param([LOADING, BENCHMARKING, ERRORED, LOADING, BENCHMARKING, READY], id="retry"),
        pytest.param([LOADING, BENCHMARKING, READY, ERRORED, LOADING], id="health fails, recovers"),
        pytest.param([LOADING, BENCHMARKING, READY, LOADING, BENCHMARKING], id="model reloads"),
        pytest.param([LOADING, BENCHMARKING, ERRORED, ERRORED, LOADING], id="readiness restarts"),
        pytest.param([LOADING, DRAINING, READY, ERRORED], id="drain during loading"),
    ],
)
def test_the_paths_the_worker_takes(moves: list[WorkerState]) -> None:
    status = WorkerStatus()
    for state in moves:
        status.set_state(state)


# --- what each move records ---------------------------------------------------------------
def test_ready_clears_the_error_and_sets_loadtime_once() -> None:
    status = status_in(BENCHMARKING)
    status.set_state(READY, "ignored")
    assert status.error_msg == "" and status.loadtime > 0 and status.ready
    first = status.loadtime
    status.set_state(ERRORED, "health failing")
    advance(status, READY)
    assert status.loadtime == first and status.error_msg == ""


def test_recovering_keeps_saying_why_it_errored_until_ready() -> None:
    status = status_in(LOADING)
    status.set_state(ERRORED, "model never loaded")
    status.set_state(LOADING)
    assert status.error_msg == "model never loaded"


def test_setting_the_same_state_updates_the_error_and_wakes_only_on_change() -> None:
    status = status_in(ERRORED)
    version = status.version
    status.set_state(ERRORED, "worker task readiness failed: boom")
    assert status.error_msg == "worker task readiness failed: boom"
    assert status.version == version + 1
    status.set_state(ERRORED, "worker task readiness failed: boom")
    status.set_state(ERRORED)
    assert status.version == version + 1


def test_perf_wakes_only_when_it_changes() -> None:
    status = WorkerStatus()
    status.set_perf(12.5)
    assert status.version == 1 and status.max_perf == 12.5
    status.set_perf(12.5)
    assert status.version == 1


# --- waiting for changes ------------------------------------------------------------------
async def test_every_waiter_wakes_at_a_change() -> None:
    status = WorkerStatus()
    waiters = [asyncio.create_task(status.wait_changed(5)) for _ in range(50)]
    await asyncio.sleep(0)
    status.set_state(LOADING)
    assert await asyncio.gather(*waiters) == [True] * 50


async def test_an_error_message_alone_wakes_waiters() -> None:
    status = status_in(ERRORED)
    waiter = asyncio.create_task(status.wait_changed(5))
    await asyncio.sleep(0)
    status.set_state(ERRORED, "a second failure")
    assert await waiter


async def test_a_change_before_the_wait_is_not_new_to_a_fresh_waiter() -> None:
    status = WorkerStatus()
    status.set_state(LOADING)
    assert not await status.wait_changed(0.05)


async def test_a_change_since_the_version_seen_is_not_lost() -> None:
    """The reporter's case: a change made while it sends a report wakes its next wait."""
    status = WorkerStatus()
    seen = status.version
    status.set_state(LOADING)
    assert await asyncio.wait_for(status.wait_changed(5, seen), 1)
    assert not await status.wait_changed(0.05, status.version)


async def test_a_waiter_that_times_out_or_is_cancelled_leaves_the_others_waiting() -> None:
    status = WorkerStatus()
    patient = asyncio.create_task(status.wait_changed(5))
    cancelled = asyncio.create_task(status.wait_changed(5))
    assert not await status.wait_changed(0.01)
    cancelled.cancel()
    await asyncio.sleep(0)
    status.set_state(LOADING)
    assert await patient
    assert cancelled.cancelled()


async def test_repeated_timeouts_hold_nothing_back() -> None:
    """Bounded memory: a waiter that timed out leaves no callback behind on the shared future."""
    status = WorkerStatus()
    for _ in range(100):
        assert not await status.wait_changed(0)
    pending = status._next_change
    assert pending is not None and not pending.done()
    assert not pending._callbacks


def test_a_status_waited_on_in_one_loop_works_in_the_next() -> None:
    status = WorkerStatus()
    assert not asyncio.run(status.wait_changed(0.01))

    async def change_then_wait() -> bool:
        waiter = asyncio.create_task(status.wait_changed(5))
        await asyncio.sleep(0)
        status.set_state(LOADING)
        return await waiter

    assert asyncio.run(change_then_wait())
