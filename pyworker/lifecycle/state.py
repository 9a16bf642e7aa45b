"""The worker's readiness state machine and the figures that go with it.

Every state change goes through `TRANSITIONS`; a move it does not list raises
`IllegalTransition`. Raising is safe in production: the table lets every live state go to
ERRORED and every state to DRAINING, so the handlers an illegal move lands in (a readiness
pass failing, a supervised task crashing) can always report it, and no move of the worker's
own code is illegal (tests/lifecycle/test_state.py walks each caller's moves).

DRAINING is final, and a move out of it is refused without a word: readiness keeps running
while the worker drains, and its late updates must not bring a stopping worker back.
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


_DRAIN = "SIGTERM: the worker drains (serving.drain)"
_CRASH = "the readiness task crashed (serving.app `_report_failure`)"

TRANSITIONS: Mapping[WorkerState, Mapping[WorkerState, str]] = MappingProxyType(
    {
        WorkerState.STARTING: MappingProxyType(
            {
                WorkerState.LOADING: "readiness starts: the GPUs are healthy",
                WorkerState.ERRORED: f"the GPU health check failed, or {_CRASH}",
                WorkerState.DRAINING: _DRAIN,
            }
        ),
        WorkerState.LOADING: MappingProxyType(
            {
                WorkerState.BENCHMARKING: (
                    "the model loaded (its load line, its health, or its in-process lifecycle "
                    "entered): a readiness pass begins"
                ),
                WorkerState.ERRORED: (
                    "a fatal log line, the load deadline passed, the in-process lifecycle "
                    f"failed to load, or {_CRASH}"
                ),
                WorkerState.DRAINING: _DRAIN,
            }
        ),
        WorkerState.BENCHMARKING: MappingProxyType(
            {
                WorkerState.READY: "the benchmark, health check and public key are done",
                WorkerState.ERRORED: (
                    "the pass failed (no public key from any REPORT_ADDR included), a fatal log "
                    f"line, or {_CRASH}"
                ),
                WorkerState.DRAINING: _DRAIN,
            }
        ),
        WorkerState.READY: MappingProxyType(
            {
                WorkerState.LOADING: "the model server loaded again (its load line seen anew)",
                WorkerState.ERRORED: f"its health check failing, a fatal log line, or {_CRASH}",
                WorkerState.DRAINING: _DRAIN,
            }
        ),
        WorkerState.ERRORED: MappingProxyType(
            {
                WorkerState.LOADING: (
                    "recovery: a load line, health back, a retry, the public key loaded, a restart,"
                    " or the in-process lifecycle entered after its load deadline"
                ),
                WorkerState.DRAINING: _DRAIN,
            }
        ),
        WorkerState.DRAINING: MappingProxyType({}),
    }
)
"""From-state -> to-state -> why the worker's code makes that move; no other move is legal.

Setting the current state again is always allowed: it updates `error_msg` (a second error
while errored says what failed last).
"""


class IllegalTransition(RuntimeError):
    """A move `TRANSITIONS` does not list: a bug in whoever asked for it."""

    def __init__(self, source: WorkerState, target: WorkerState) -> None:
        super().__init__(f"illegal worker state transition {source} -> {target}")
        self.source = source
        self.target = target


def is_legal(source: WorkerState, target: WorkerState) -> bool:
    return source is target or target in TRANSITIONS[source]


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

    def set_state(self, state: WorkerState, error_msg: str | None = None) -> None:
        """Move to `state` (raises IllegalTransition if not allowed), `error_msg` if given.

        While draining, other states are ignored; an error message is still recorded, so the
        final report says why the model server went away.
        """
        moves = state is not self.state and self.state is not WorkerState.DRAINING
        if moves and state not in TRANSITIONS[self.state]:
            raise IllegalTransition(self.state, state)
        changed = False
        if error_msg is not None and error_msg != self.error_msg:
            self.error_msg = error_msg
            changed = True
        if moves:
            self._enter(state)
            changed = True
        if changed:
            self._notify()

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
