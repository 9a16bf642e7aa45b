"""Closed-loop capacity: the workload units a server completes per second with N always in flight.

The independent measurement that a worker's `max_perf` is held to (docs: issue 19, item 7).
N lanes each send a request, wait for its answer and send the next, so N requests are always
in flight and no barrier idles the server. For each N (1, 2, 4, ... up to a ceiling) the load
runs a warm-up, then `windows` consecutive measured windows of `window` seconds, and its
figure is the median of the windows' (one window disturbed by another process on the machine
does not set it). A request
counts in a window in proportion to the part of its lifetime that lies inside it (pro rata),
so a request spanning an edge is split, never dropped or counted twice. Lanes keep sending
until every request that started inside the windows has ended, so the server sees N in flight
for the whole of each request it is credited with; the few sent after that are cut off.
A sweep can measure its best N once more (`again`): that figure, not the best step's, is the
capacity it reports (`Sweep.sustained`).

Two units are counted for each request: `produced` (what the answer says was processed: for
the OpenAI family, `usage`'s prompt plus completion tokens, the unit the worker's benchmark
reports) and `requested` (the workload the worker charges before the request runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

Payload = dict[str, Any]
Units = Callable[[Mapping[str, Any]], float | None]
"""Work an answer document reports (None when this document says nothing)."""
FAILURE_PAUSE = 0.05
"""After a failed request a lane waits this long, so an instant refusal cannot spin."""


@dataclass(frozen=True, slots=True)
class Completed:
    started: float
    ended: float
    produced: float
    requested: float

    def share(self, start: float, end: float) -> float:
        """The fraction of this request's lifetime that lies in [start, end)."""
        duration = self.ended - self.started
        overlap = min(self.ended, end) - max(self.started, start)
        if duration <= 0:
            return 1.0 if start <= self.ended < end else 0.0
        return max(0.0, overlap) / duration


@dataclass(frozen=True, slots=True)
class Step:
    """What one N sustained over its measured windows."""

    in_flight: int
    produced: float
    """Produced units per second: the median of the windows' figures."""
    requested: float
    """Requested (charged) units per second, likewise."""
    requests: float
    """Requests per second, pro rata like the units."""
    windows: list[float]
    """Produced units per second in each window."""
    latency_p50: float
    latency_p90: float
    failures: int
    missing_usage: int
    """Successful answers that reported no produced work (counted as 0 produced)."""
    started: float = 0.0
    ended: float = 0.0
    """The measured windows' span, in `time.monotonic()` seconds."""

    @property
    def spread(self) -> float:
        """(highest - lowest) / mean of the windows' figures: the noise within this step."""
        mean = statistics.fmean(self.windows) if self.windows else 0.0
        return (max(self.windows) - min(self.windows)) / mean if mean > 0 else 0.0


@dataclass(slots=True)
class Sweep:
    steps: list[Step] = field(default_factory=list)
    again: Step | None = None
    """The best step's N measured once more, where it was."""

    @property
    def best(self) -> Step:
        """The step with the most produced units per second."""
        return max(self.steps, key=lambda step: step.produced)

    @property
    def sustained(self) -> Step:
        """The capacity: the best N measured again, else the best step. The best step is the
        highest of several noisy figures, so its own figure leans high; a fresh measurement
        at the same N does not (the worker's own ramp measures its choice again likewise)."""
        return self.again if self.again is not None else self.best

    def table(self) -> str:
        lines = [
            "| in flight | produced/s | requested/s | requests/s | windows' spread |"
            " p50 s | p90 s | failed |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for step in self.steps:
            lines.append(
                f"| {step.in_flight} | {step.produced:,.0f} | {step.requested:,.0f} |"
                f" {step.requests:,.1f} | {step.spread:.1%} | {step.latency_p50:.3f} |"
                f" {step.latency_p90:.3f} | {step.failures} |"
            )
        return "\n".join(lines)


def concurrency_levels(ceiling: int) -> list[int]:
    """1, 2, 4, ... up to `ceiling`, which is included even when it is not a power of two."""
    levels, level = [], 1
    while level < ceiling:
        levels.append(level)
        level *= 2
    return [*levels, max(ceiling, 1)]


def answer_documents(body: bytes, content_type: str) -> Iterator[Mapping[str, Any]]:
    """The JSON objects of an answer: the body itself, or each SSE `data:` event."""
    if content_type == "text/event-stream":
        lines = [line[5:].strip() for line in body.splitlines() if line.startswith(b"data:")]
    else:
        lines = [body]
    for line in lines:
        if not line or line == b"[DONE]":
            continue
        with contextlib.suppress(orjson.JSONDecodeError):
            document = orjson.loads(line)
            if isinstance(document, dict):
                yield document


@dataclass(frozen=True, slots=True)
class Target:
    """Where and how to send: a worker's route and what one request carries."""

    url: str
    """The route's full URL, e.g. http://127.0.0.1:3000/v1/completions."""
    payloads: Sequence[Payload]
    """Sent in turn, round robin over all lanes."""
    envelope: Callable[[Payload], Mapping[str, Any]]
    """The body that carries a payload (for a worker: `{"auth_data": ..., "payload": ...}`)."""
    produced: Units
    requested: Callable[[Payload], float]
    timeout: float = 120.0


class ClosedLoop:
    """Keeps N requests in flight against `target` and measures what completes."""

    def __init__(self, target: Target, session: aiohttp.ClientSession) -> None:
        if not target.payloads:
            raise ValueError("no payloads to send")
        self.target = target
        self.session = session
        self._next = 0
        self._bodies = [orjson.dumps(target.envelope(p)) for p in target.payloads]

    async def sweep(
        self,
        levels: Sequence[int],
        warmup: float,
        window: float,
        windows: int = 1,
        report: Callable[[Step], None] | None = None,
        again: int = 0,
    ) -> Sweep:
        """Each level in turn, then the best of them measured once more over `again` windows
        (0: not measured again)."""
        sweep = Sweep()
        for in_flight in levels:
            step = await self.step(in_flight, warmup, window, windows)
            sweep.steps.append(step)
            if report is not None:
                report(step)
        if again > 0 and sweep.steps:
            sweep.again = await self.step(sweep.best.in_flight, warmup, window, again)
        return sweep

    async def step(self, in_flight: int, warmup: float, window: float, windows: int = 1) -> Step:
        """Run N lanes for a warm-up plus `windows` windows; measure the windows."""
        start = time.monotonic() + warmup
        end = start + window * windows
        records: list[Completed] = []
        failures: list[float] = []
        missing: list[float] = []
        pending = [0]  # requests started before `end` and not yet ended
        drained = asyncio.Event()

        async def lane() -> None:
            while True:
                began = time.monotonic()
                counted = began < end
                pending[0] += counted
                try:
                    await self._one(began, records, failures, missing)
                finally:
                    pending[0] -= counted
                    if pending[0] == 0 and time.monotonic() >= end:
                        drained.set()

        lanes = [asyncio.create_task(lane()) for _ in range(in_flight)]
        try:
            await asyncio.sleep(max(0.0, end - time.monotonic()))
            if pending[0]:
                await asyncio.wait_for(drained.wait(), self.target.timeout)
        finally:
            for task in lanes:
                task.cancel()
            await asyncio.gather(*lanes, return_exceptions=True)
        return summarize(in_flight, records, failures, missing, start, window, windows)

    async def _one(
        self,
        began: float,
        records: list[Completed],
        failures: list[float],
        missing: list[float],
    ) -> None:
        index = self._next % len(self._bodies)
        self._next += 1
        payload = self.target.payloads[index]
        try:
            produced = await self._send(self._bodies[index])
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
            failures.append(time.monotonic())
            await asyncio.sleep(FAILURE_PAUSE)
            return
        ended = time.monotonic()
        if produced is None:
            missing.append(ended)
        requested = self.target.requested(payload)
        records.append(Completed(began, ended, produced or 0.0, requested))

    async def _send(self, body: bytes) -> float | None:
        """The answer's produced work; raises ValueError on a status other than 200."""
        timeout = aiohttp.ClientTimeout(total=self.target.timeout)
        headers = {"Content-Type": "application/json"}
        async with self.session.post(
            self.target.url, data=body, headers=headers, timeout=timeout
        ) as answer:
            content = await answer.read()
            if answer.status != 200:
                raise ValueError(f"HTTP {answer.status}")
            content_type = answer.content_type
        produced = None
        for document in answer_documents(content, content_type):
            value = self.target.produced(document)
            if value is not None:
                produced = value
        return produced


def summarize(
    in_flight: int,
    records: list[Completed],
    failures: list[float],
    missing: list[float],
    start: float,
    window: float,
    windows: int,
) -> Step:
    """Each figure is the median of the windows' (with two windows, their mean), so that one
    window disturbed by something else on the machine does not set the step's figure."""
    end = start + window * windows
    produced, requested, requests = [], [], []
    for number in range(windows):
        low = start + number * window
        shares = [(record, record.share(low, low + window)) for record in records]
        produced.append(sum(r.produced * share for r, share in shares) / window)
        requested.append(sum(r.requested * share for r, share in shares) / window)
        requests.append(sum(share for _, share in shares) / window)
    inside = [r for r in records if start <= r.ended < end]
    latencies = sorted(r.ended - r.started for r in inside)
    return Step(
        in_flight=in_flight,
        produced=statistics.median(produced),
        requested=statistics.median(requested),
        requests=statistics.median(requests),
        windows=produced,
        latency_p50=percentile(latencies, 0.5),
        latency_p90=percentile(latencies, 0.9),
        failures=sum(1 for moment in failures if start <= moment < end),
        missing_usage=sum(1 for moment in missing if start <= moment < end),
        started=start,
        ended=end,
    )


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of sorted values; 0 for none."""
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]
