"""The worker's state machine: events in, the next state out of one table.

The parts that drive the worker (readiness and its load watch, the benchmark, the health
watch, the supervisor, the drain) say what happened: they hand `WorkerStatus.handle` a
`LifecycleEvent`, with an `error_msg` when something failed. `TRANSITIONS` says what each
event does in each state; every rule is there, DRAINING's finality included:

| event                  | starting | loading      | benchmarking | ready    | errored  | draining |
|------------------------|----------|--------------|--------------|----------|----------|----------|
| `gpus_healthy`         | loading  | -            | -            | -        | loading  | draining |
| `gpus_failed`          | errored  | errored      | errored      | errored  | errored  | draining |
| `pass_started`         | -        | loading      | -            | loading  | loading  | draining |
| `benchmark_started`    | -        | benchmarking | -            | -        | -        | draining |
| `pass_done`            | -        | -            | ready        | -        | -        | draining |
| `fatal_line_seen`      | errored  | errored      | errored      | errored  | ignored  | draining |
| `load_deadline_passed` | errored  | errored      | errored      | errored  | ignored  | draining |
| `load_failed`          | errored  | errored      | errored      | errored  | errored  | draining |
| `key_missing`          | errored  | errored      | errored      | errored  | ignored  | draining |
| `benchmark_failed`     | errored  | errored      | errored      | errored  | ignored  | draining |
| `pass_failed`          | errored  | errored      | errored      | errored  | ignored  | draining |
| `health_failed`        | errored  | errored      | errored      | errored  | ignored  | draining |
| `task_failed`          | errored  | errored      | errored      | errored  | errored  | draining |
| `drain_requested`      | draining | draining     | draining     | draining | draining | draining |

A state names the next one: the same state means the worker stays, and the `error_msg` the
event brings replaces the last (a crashed task while errored says what failed last; so does
an error while draining, so the final report says why the model server went away).
"ignored" changes nothing: while errored, the first error since the worker was last ready is
usually the root cause, and its cause decides how the worker recovers. "-" raises
`IllegalTransition`: a bug in whoever posted the event. Raising is safe: every failure event
moves every live state to ERRORED and `drain_requested` every state to DRAINING, so the
handlers an illegal event lands in (a failed readiness pass, a supervised task crashing) can
always report it; tests/lifecycle/test_state.py checks this table against `TRANSITIONS`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from types import MappingProxyType

from pyworker.backports import StrEnum

logger = logging.getLogger(__name__)


class WorkerState(StrEnum):
    STARTING = "starting"
    LOADING = "loading"
    BENCHMARKING = "benchmarking"
    READY = "ready"
    ERRORED = "errored"
    DRAINING = "draining"


class LifecycleEvent(StrEnum):
    """What happened to the worker, said by the part that saw it: readiness
    (`lifecycle/readiness/`: its coordinator, the load watch in `loading.py`, the health watch
    in `health.py`), the supervisor's failure handler (`serving/compose.py`) and the drain."""

    GPUS_HEALTHY = "gpus_healthy"
    """Readiness starts (or starts again after a crash): the GPUs pass their check."""
    GPUS_FAILED = "gpus_failed"
    """The GPU check found a problem (too little free VRAM, throttling, ...)."""
    PASS_STARTED = "pass_started"
    """A readiness pass begins: the model loaded (its load line, its health answering, its
    in-process lifecycle entered), or it is tried again (a retry, health back, the key)."""
    BENCHMARK_STARTED = "benchmark_started"
    """The pass measures the model, or takes its cached figure."""
    PASS_DONE = "pass_done"
    """The benchmark, the health check and the public key are done."""
    FATAL_LINE_SEEN = "fatal_line_seen"
    """The model's log said it broke (a fatal error pattern)."""
    LOAD_DEADLINE_PASSED = "load_deadline_passed"
    """No load signal within the load deadline."""
    LOAD_FAILED = "load_failed"
    """The in-process model's lifecycle failed to enter."""
    KEY_MISSING = "key_missing"
    """The pass is done but for the public key, which no REPORT_ADDR gave."""
    BENCHMARK_FAILED = "benchmark_failed"
    """The benchmark failed, or the health path did not answer 200 in time."""
    PASS_FAILED = "pass_failed"
    """Anything else the engine or a hook made the pass raise."""
    HEALTH_FAILED = "health_failed"
    """While ready, the health path failed `health_failures` times in a row."""
    TASK_FAILED = "task_failed"
    """A supervised task the worker cannot serve without crashed (it is restarted)."""
    DRAIN_REQUESTED = "drain_requested"
    """SIGTERM (serving.drain): the worker stops taking requests, for good."""


FAILURES = frozenset(
    {
        LifecycleEvent.GPUS_FAILED,
        LifecycleEvent.FATAL_LINE_SEEN,
        LifecycleEvent.LOAD_DEADLINE_PASSED,
        LifecycleEvent.LOAD_FAILED,
        LifecycleEvent.KEY_MISSING,
        LifecycleEvent.BENCHMARK_FAILED,
        LifecycleEvent.PASS_FAILED,
        LifecycleEvent.HEALTH_FAILED,
        LifecycleEvent.TASK_FAILED,
    }
)
"""The events that say what went wrong: each brings the `error_msg`."""
FIRST_ERROR_STANDS = frozenset(
    {
        LifecycleEvent.FATAL_LINE_SEEN,
        LifecycleEvent.LOAD_DEADLINE_PASSED,
        LifecycleEvent.KEY_MISSING,
        LifecycleEvent.BENCHMARK_FAILED,
        LifecycleEvent.PASS_FAILED,
        LifecycleEvent.HEALTH_FAILED,
    }
)
"""Failures ignored while errored: the first error since the worker was last ready is usually
the root cause. The other three say what failed last: the GPU check of a restarted readiness,
the in-process lifecycle (the cause even over the load deadline's error), a crashed task."""
IGNORED = None
"""The outcome of an event that changes nothing in that state."""

Outcome = WorkerState | None


def _live(**own: Outcome) -> MappingProxyType[LifecycleEvent, Outcome]:
    """A live state's row: every failure to ERRORED, the drain to DRAINING, then its own."""
    row: dict[LifecycleEvent, Outcome] = {
        event: WorkerState.ERRORED for event in LifecycleEvent if event in FAILURES
    }
    row[LifecycleEvent.DRAIN_REQUESTED] = WorkerState.DRAINING
    row |= {LifecycleEvent(name): following for name, following in own.items()}
    return MappingProxyType(row)


TRANSITIONS: Mapping[WorkerState, Mapping[LifecycleEvent, Outcome]] = MappingProxyType(
    {
        WorkerState.STARTING: _live(gpus_healthy=WorkerState.LOADING),
        WorkerState.LOADING: _live(
            pass_started=WorkerState.LOADING, benchmark_started=WorkerState.BENCHMARKING
        ),
        WorkerState.BENCHMARKING: _live(pass_done=WorkerState.READY),
        WorkerState.READY: _live(pass_started=WorkerState.LOADING),
        WorkerState.ERRORED: _live(
            gpus_healthy=WorkerState.LOADING,
            pass_started=WorkerState.LOADING,
            **{event: IGNORED for event in FIRST_ERROR_STANDS},
        ),
        WorkerState.DRAINING: MappingProxyType(
            {event: WorkerState.DRAINING for event in LifecycleEvent}
        ),
    }
)
"""State -> event -> the next state (the same: it stays), or IGNORED; a pair not listed is
illegal. The table in this module's docstring is the same, for reading."""


class IllegalTransition(RuntimeError):
    """An event `TRANSITIONS` does not allow in the current state: a bug in who posted it."""

    def __init__(self, state: WorkerState, event: LifecycleEvent) -> None:
        super().__init__(f"illegal worker state transition: {event} while {state}")
        self.state = state
        self.event = event


def outcome(state: WorkerState, event: LifecycleEvent) -> Outcome:
    """The state `event` leads to from `state` (IGNORED: none); IllegalTransition if none."""
    row = TRANSITIONS[state]
    if event not in row:
        raise IllegalTransition(state, event)
    return row[event]


class WorkerStatus:
    """Current state, error and perf; wakes every `wait_changed` waiter at each change.

    Changes are counted in `version`: a waiter says which version it last saw and wakes for
    any later one, so none misses a change made while it was busy, and any number may wait.
    """

    def __init__(self) -> None:
        self.state = WorkerState.STARTING
        self.error_msg = ""
        self.max_perf = 0.0
        self.started_at = time.monotonic()
        self.loadtime = 0.0
        self.public_key_loaded = False
        self._version = 0
        self._next_change: asyncio.Future[None] | None = None
        """Resolved at the next change; made only while someone waits (one for them all)."""

    @property
    def ready(self) -> bool:
        return self.state is WorkerState.READY

    @property
    def version(self) -> int:
        """How many changes (state, error_msg or perf) there have been."""
        return self._version

    def handle(self, event: LifecycleEvent, error_msg: str | None = None) -> bool:
        """Apply `event` as `TRANSITIONS` says, recording `error_msg` if given.

        False when the table ignores it here; raises IllegalTransition, changing nothing,
        when the table does not allow it.
        """
        following = outcome(self.state, event)
        if following is IGNORED:
            return False
        changed = False
        if error_msg is not None and error_msg != self.error_msg:
            self.error_msg = error_msg
            changed = True
        if following is not self.state:
            self._enter(following)
            changed = True
        if changed:
            self._notify()
        return True

    def _enter(self, state: WorkerState) -> None:
        logger.info("worker state %s -> %s", self.state, state)
        self.state = state
        if state is WorkerState.READY:
            self.error_msg = ""
            if not self.loadtime:
                self.loadtime = max(time.monotonic() - self.started_at, 1e-3)

    def set_perf(self, perf: float) -> None:
        if perf != self.max_perf:
            self.max_perf = perf
            self._notify()

    def _notify(self) -> None:
        self._version += 1
        waiting, self._next_change = self._next_change, None
        if waiting is not None and not waiting.done() and not waiting.get_loop().is_closed():
            waiting.set_result(None)

    async def wait_changed(self, timeout: float, since: int | None = None) -> bool:
        """Wait up to `timeout` seconds for a change after version `since` (default: now).

        True at once if there was one already: pass the `version` read when last woken, and
        changes made meanwhile are not lost.
        """
        if since is not None and since != self._version:
            return True
        waiting = self._next_change
        loop = asyncio.get_running_loop()
        if waiting is None or waiting.get_loop() is not loop:
            waiting = self._next_change = loop.create_future()
        # asyncio.wait, unlike wait_for, leaves the shared future alone when it times out.
        done, _ = await asyncio.wait({waiting}, timeout=timeout)
        return bool(done)
