"""The closed loop the ramp measures with: N senders, each keeping one request in flight.

A new request starts as one ends (no rounds, so no idle tail is counted as lost capacity), and
N can grow or shrink between measurements (`resize`). What each request did is recorded
(`Completion`), and a window's throughput counts each finished request's work pro rata of the
part of its life inside the window (`prorata`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

from pyworker.config import JSONObject

FAILURE_PAUSE = 0.05
"""A failed request's sender waits this long before the next: a dead server is not hammered."""
DRAIN_SECONDS = 30.0
"""How long the ramp's last requests may take to end before they are cancelled."""


@dataclass(frozen=True, slots=True)
class Done:
    """What one request did: its work, and the output tokens its answer says it generated
    (None where it does not say: only an LLM's answers do)."""

    work: float
    output_tokens: float | None = None


Send = Callable[[JSONObject], Awaitable[Done | None]]
"""Sends one payload; what it did, or None when it failed."""


@dataclass(slots=True)
class Completion:
    started: float
    ended: float
    work: float | None
    output_tokens: float | None = None

    @property
    def per_token(self) -> float | None:
        """Seconds per output token: the request's time to its last byte over its tokens."""
        if self.work is None or not self.output_tokens:
            return None
        return (self.ended - self.started) / self.output_tokens


class BudgetSpent(Exception):
    """The time budget ran out while waiting inside a step."""


class ClosedLoop:
    """Senders that each keep one request in flight; N of them at a time (`resize`)."""

    def __init__(self, send: Send, payloads: Iterator[JSONObject]) -> None:
        self.send = send
        self.payloads = payloads
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.target = 0
        """How many senders keep a request in flight; one past it stops after its request."""
        self.records: list[Completion] = []
        self.in_flight: dict[int, float] = {}
        """Each busy sender's request start time."""
        self.finished = asyncio.Event()
        self.latest_end = 0.0
        self.last_error = ""
        self.stopping = False

    def resize(self, target: int) -> None:
        """Keep `target` in flight: new senders start now, surplus ones end after their
        current request."""
        self.target = target
        for index in range(target):
            task = self.tasks.get(index)
            if task is None or task.done():
                self.tasks[index] = asyncio.create_task(self._sender(index))

    def oldest_start(self) -> float:
        return min(self.in_flight.values(), default=time.monotonic())

    async def _sender(self, index: int) -> None:
        try:
            await self._send_while_wanted(index)
        finally:
            self.in_flight.pop(index, None)  # a sender that ends has nothing in flight

    async def _send_while_wanted(self, index: int) -> None:
        while not self.stopping and index < self.target:
            payload = next(self.payloads)
            started = time.monotonic()
            self.in_flight[index] = started
            try:
                done = await self.send(payload)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # a timeout, a dropped connection: a failed request
                self.last_error = error.__class__.__name__
                done = None
            self.latest_end = time.monotonic()
            work, tokens = (None, None) if done is None else (done.work, done.output_tokens)
            self.records.append(Completion(started, self.latest_end, work, tokens))
            self.finished.set()
            if done is None:
                del self.in_flight[index]
                await asyncio.sleep(FAILURE_PAUSE)
            else:
                await asyncio.sleep(0)  # a handler that never suspends must not starve the loop

    async def wait_until_started_after(
        self, moment: float, deadline: float, one_ended: bool = False
    ) -> None:
        """Until every request in flight started after `moment` (all older ones ended), and
        with `one_ended` until at least one ended after it."""
        while self.oldest_start() < moment or (one_ended and self.latest_end <= moment):
            self.finished.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise BudgetSpent
            try:
                await asyncio.wait_for(self.finished.wait(), left)
            except asyncio.TimeoutError:
                raise BudgetSpent from None

    async def close(self) -> None:
        """Send no more; let the requests in flight end (the engine would go on with them
        anyway, under the worker's first real requests), cancelling what is left after
        DRAIN_SECONDS."""
        self.stopping = True
        tasks = list(self.tasks.values())
        if tasks:
            await asyncio.wait(tasks, timeout=DRAIN_SECONDS)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.tasks.clear()


def prorata(records: list[Completion], start: float, end: float) -> float:
    """Work per second in [start, end]: each request's work times its share of life inside."""
    work = 0.0
    for record in records:
        if record.work is None or record.ended <= start or record.started >= end:
            continue
        duration = record.ended - record.started
        if duration <= 0:
            work += record.work
            continue
        inside = min(record.ended, end) - max(record.started, start)
        work += record.work * inside / duration
    return work / (end - start)
