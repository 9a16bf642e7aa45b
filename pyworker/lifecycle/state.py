"""The worker's readiness state machine and the figures that go with it."""

from __future__ import annotations

import asyncio
import logging
import time

from pyworker.backports import StrEnum

logger = logging.getLogger(__name__)


class WorkerState(StrEnum):
    STARTING = "starting"
    LOADING = "loading"
    BENCHMARKING = "benchmarking"
    READY = "ready"
    ERRORED = "errored"
    DRAINING = "draining"


class WorkerStatus:
    """Current state, error and perf; wakes whoever waits on `changed` at each transition.

    Transitions are logged once and signalled at once so the reporter can push them without
    waiting for its next tick.
    """

    def __init__(self) -> None:
        self.state = WorkerState.STARTING
        self.error_msg = ""
        self.max_perf = 0.0
        self.started_at = time.monotonic()
        self.loadtime = 0.0
        self.public_key_loaded = False
        self._changed = asyncio.Event()

    @property
    def ready(self) -> bool:
        return self.state is WorkerState.READY

    def set_state(self, state: WorkerState, error_msg: str | None = None) -> None:
        if error_msg is not None:
            self.error_msg = error_msg
        if state is self.state:
            self._changed.set()
            return
        if self.state is WorkerState.DRAINING:
            return  # draining is final: nothing brings a stopping worker back
        logger.info("worker state %s -> %s", self.state, state)
        self.state = state
        if state is WorkerState.READY:
            self.error_msg = ""
            if not self.loadtime:
                self.loadtime = max(time.monotonic() - self.started_at, 1e-3)
        self._changed.set()

    def set_perf(self, perf: float) -> None:
        self.max_perf = perf
        self._changed.set()

    async def wait_changed(self, timeout: float) -> bool:
        """Wait for the next transition, up to `timeout` seconds; True if one happened."""
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        finally:
            self._changed.clear()
        return True
