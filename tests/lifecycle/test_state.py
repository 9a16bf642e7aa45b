"""The worker's state machine: what each event does in each state, and who is woken."""

from __future__ import annotations

import asyncio
import inspect

import pytest

from pyworker.lifecycle import state as state_module
from pyworker.lifecycle.state import (
    FAILURES,
    TRANSITIONS,
    IllegalTransition,
    LifecycleEvent,
    WorkerState,
    WorkerStatus,
    outcome,
)
from tests.support.states import advance

STARTING, LOADING, BENCHMARKING, READY, ERRORED, DRAINING = WorkerState
LIVE = [state for state in WorkerState if state is not DRAINING]
PAIRS = [(state, event) for state in WorkerState for event in LifecycleEvent]
Event = LifecycleEvent

EXPECTED = {
    STARTING: "loading errored - - - errored errored errored errored errored errored errored"
    " errored draining",
    LOADING: "- errored loading benchmarking - errored errored errored errored errored errored"
    " errored errored draining",
    BENCHMARKING: "- errored - - ready errored errored errored errored errored errored errored"
    " errored draining",
    READY: "- errored loading - - errored errored errored errored errored errored errored"
    " errored draining",
    ERRORED: "loading errored loading - - ignored ignored errored ignored ignored ignored"
    " ignored errored draining",
    DRAINING: " ".join(["draining"] * len(LifecycleEvent)),
}
"""Each state's outcome of every event, in `LifecycleEvent`'s order: a state (the same:
stays), "ignored", or "-" (illegal)."""


@pytest.fixture(autouse=True)
def illegal_transitions() -> None:
    """This module makes illegal moves on purpose (the suite's guard is off here)."""


def status_in(state: WorkerState, error_msg: str | None = None) -> WorkerStatus:
    status = WorkerStatus()
    advance(status, state, error_msg)
    assert status.state is state
    return status


def _said(state: WorkerState, event: LifecycleEvent) -> str:
    if event not in TRANSITIONS[state]:
        return "-"
    following = TRANSITIONS[state][event]
    return "ignored" if following is None else str(following)


# --- the table ----------------------------------------------------------------------------
def test_the_table_is_the_documented_one() -> None:
    said = {
        state: " ".join(_said(state, event) for event in LifecycleEvent) for state in WorkerState
    }
    assert said == EXPECTED


def test_the_docstring_shows_the_table() -> None:
    """The grid in pyworker/lifecycle/state.py's docstring, read back, is `TRANSITIONS`."""
    doc = inspect.getdoc(state_module) or ""
    rows = [line for line in doc.splitlines() if line.startswith("| `")]
    header = next(line for line in doc.splitlines() if line.startswith("| event"))
    states = [WorkerState(cell.strip()) for cell in header.strip("|").split("|")[1:]]
    shown = {}
    for row in rows:
        name, *cells = (cell.strip() for cell in row.strip("|").split("|"))
        for state, cell in zip(states, cells, strict=True):
            shown[state, Event(name.strip("`"))] = cell
    assert shown == {(state, event): _said(state, event) for state, event in PAIRS}


def test_every_live_state_can_report_any_failure_and_drain() -> None:
    """What makes raising safe: the handlers an illegal event reaches can always move on."""
    for state in LIVE:
        assert TRANSITIONS[state][Event.DRAIN_REQUESTED] is DRAINING
        for event in FAILURES:
            assert TRANSITIONS[state][event] in (
                (ERRORED, None) if state is ERRORED else (ERRORED,)
            )


@pytest.mark.parametrize(("state", "event"), PAIRS)
def test_every_event_in_every_state(state: WorkerState, event: LifecycleEvent) -> None:
    status = status_in(state, "the first error" if state is ERRORED else None)
    before = (status.state, status.error_msg, status.version, status.loadtime)
    message = "what failed" if event in FAILURES else None
    said = _said(state, event)
    if said == "-":
        with pytest.raises(IllegalTransition) as raised:
            status.handle(event, message)
        assert (raised.value.state, raised.value.event) == (state, event)
        assert (status.state, status.error_msg, status.version, status.loadtime) == before
        return
    if said == "ignored":
        assert not status.handle(event, message)
        assert outcome(state, event) is None
        assert (status.state, status.error_msg, status.version, status.loadtime) == before
        return
    assert status.handle(event, message)
    assert status.state is outcome(state, event) is WorkerState(said)
    changed = status.state is not state or message is not None
    assert status.version == before[2] + changed
    if message is not None:
        assert status.error_msg == message
    elif status.state is not READY:
        assert status.error_msg == before[1]


@pytest.mark.parametrize("event", list(LifecycleEvent))
def test_draining_is_final_and_late_events_change_nothing_else(event: LifecycleEvent) -> None:
    status = status_in(READY)
    status.handle(Event.DRAIN_REQUESTED)
    version = status.version
    assert status.handle(event)  # readiness keeps running while the worker drains: no error
    assert status.state is DRAINING and status.version == version


def test_an_error_while_draining_is_still_recorded() -> None:
    status = status_in(READY)
    status.handle(Event.DRAIN_REQUESTED)
    status.handle(Event.FATAL_LINE_SEEN, "model server error: killed")
    assert status.state is DRAINING and status.error_msg == "model server error: killed"


@pytest.mark.parametrize(
    "events",
    [
        pytest.param("gpus_healthy pass_started benchmark_started pass_done", id="start"),
        pytest.param("gpus_failed", id="GPU check fails"),
        pytest.param(
            "gpus_healthy load_deadline_passed pass_started benchmark_started",
            id="load deadline, late load",
        ),
        pytest.param(
            "gpus_healthy pass_started benchmark_started benchmark_failed"
            " pass_started benchmark_started pass_done",
            id="retry",
        ),
        pytest.param(
            "gpus_healthy pass_started benchmark_started pass_done health_failed pass_started",
            id="health fails, recovers",
        ),
        pytest.param(
            "gpus_healthy pass_started benchmark_started pass_done pass_started benchmark_started",
            id="model reloads",
        ),
        pytest.param(
            "gpus_healthy pass_started benchmark_started key_missing task_failed gpus_healthy",
            id="readiness restarts",
        ),
        pytest.param(
            "gpus_healthy drain_requested pass_started pass_done fatal_line_seen",
            id="drain during loading",
        ),
    ],
)
def test_the_paths_the_worker_takes(events: str) -> None:
    status = WorkerStatus()
    for event in map(LifecycleEvent, events.split()):
        status.handle(event, "why" if event in FAILURES else None)


# --- what each event records --------------------------------------------------------------
def test_ready_clears_the_error_and_sets_loadtime_once() -> None:
    status = status_in(BENCHMARKING)
    status.handle(Event.PASS_DONE)
    assert status.error_msg == "" and status.loadtime > 0 and status.ready
    first = status.loadtime
    status.handle(Event.HEALTH_FAILED, "health failing")
    advance(status, READY)
    assert status.loadtime == first and status.error_msg == ""


def test_recovering_keeps_saying_why_it_errored_until_ready() -> None:
    status = status_in(LOADING)
    status.handle(Event.LOAD_DEADLINE_PASSED, "model never loaded")
    status.handle(Event.PASS_STARTED)
    assert status.state is LOADING and status.error_msg == "model never loaded"


def test_while_errored_the_first_error_stands() -> None:
    status = status_in(LOADING)
    status.handle(Event.FATAL_LINE_SEEN, "model server error: CUDA out of memory")
    version = status.version
    assert not status.handle(Event.LOAD_DEADLINE_PASSED, "model never loaded")
    assert status.error_msg == "model server error: CUDA out of memory"
    assert status.version == version


def test_a_crash_while_errored_updates_the_error_and_wakes_only_on_change() -> None:
    status = status_in(ERRORED)
    version = status.version
    status.handle(Event.TASK_FAILED, "worker task readiness failed: boom")
    assert status.error_msg == "worker task readiness failed: boom"
    assert status.version == version + 1
    status.handle(Event.TASK_FAILED, "worker task readiness failed: boom")
    status.handle(Event.TASK_FAILED)
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
    status.handle(Event.GPUS_HEALTHY)
    assert await asyncio.gather(*waiters) == [True] * 50


async def test_an_error_message_alone_wakes_waiters() -> None:
    status = status_in(ERRORED)
    waiter = asyncio.create_task(status.wait_changed(5))
    await asyncio.sleep(0)
    status.handle(Event.TASK_FAILED, "a second failure")
    assert await waiter


async def test_a_change_before_the_wait_is_not_new_to_a_fresh_waiter() -> None:
    status = WorkerStatus()
    status.handle(Event.GPUS_HEALTHY)
    assert not await status.wait_changed(0.05)


async def test_a_change_since_the_version_seen_is_not_lost() -> None:
    """The reporter's case: a change made while it sends a report wakes its next wait."""
    status = WorkerStatus()
    seen = status.version
    status.handle(Event.GPUS_HEALTHY)
    assert await asyncio.wait_for(status.wait_changed(5, seen), 1)
    assert not await status.wait_changed(0.05, status.version)


async def test_a_waiter_that_times_out_or_is_cancelled_leaves_the_others_waiting() -> None:
    status = WorkerStatus()
    patient = asyncio.create_task(status.wait_changed(5))
    cancelled = asyncio.create_task(status.wait_changed(5))
    assert not await status.wait_changed(0.01)
    cancelled.cancel()
    await asyncio.sleep(0)
    status.handle(Event.GPUS_HEALTHY)
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
        status.handle(Event.GPUS_HEALTHY)
        return await waiter

    assert asyncio.run(change_then_wait())
