"""The gate of one route: FIFO or bounded concurrency, a bounded queue, and the wait estimate.

A plain `asyncio.Semaphore` gives no ordering promise across Python versions; this gate keeps
its waiters in a deque so FIFO routes really serve in arrival order, and a waiter that is
cancelled (its client hung up) leaves the queue without taking or leaking a slot.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from pyworker.backports import StrEnum
from pyworker.protocol.workload import WorkloadTotal


class GateRefusal(StrEnum):
    """Why a route's gate turns a request away (429): the message its client gets."""

    QUEUE_FULL = "queue is full"
    WAIT_TOO_LONG = "estimated wait exceeds max_queue_time"


@dataclass(slots=True, eq=False)
class RouteGate:
    """Slots for one route; `limit=None` means unlimited (no queue at all)."""

    limit: int | None
    max_queue: int
    max_queue_time: float | None
    active: int = field(default=0, init=False)
    _load: WorkloadTotal = field(default_factory=WorkloadTotal, init=False)
    _waiters: deque[asyncio.Future[None]] = field(default_factory=deque, init=False)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def workload(self) -> float:
        """Workload admitted on this route, running and queued; exactly 0 when none is."""
        return self._load.value

    def refuse(self, workload: float, perf: float) -> GateRefusal | None:
        """Why this request may not even queue, if it may not.

        The estimated wait is the workload already admitted on this route (running and
        queued) over the measured throughput; with no throughput measured yet there is no
        estimate, and only the queue bound applies.
        """
        if self.limit is not None and self.active >= self.limit and self.waiting >= self.max_queue:
            return GateRefusal.QUEUE_FULL
        limit = self.max_queue_time
        if limit is not None and perf > 0 and self.workload / perf > limit:
            return GateRefusal.WAIT_TOO_LONG
        return None

    @asynccontextmanager
    async def slot(self, workload: float) -> AsyncIterator[None]:
        self._load.add(workload)
        try:
            await self._acquire()
            try:
                yield
            finally:
                self._release()
        finally:
            self._load.remove(workload)

    async def _acquire(self) -> None:
        if self.limit is None or (self.active < self.limit and not self._waiters):
            self.active += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # the slot was handed over just as we were cancelled
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise
        # The releaser counted this slot for us when it woke us.

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # hand the slot over: `active` stays the same
                return
        self.active -= 1
