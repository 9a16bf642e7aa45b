"""The closed-loop ramp that finds a model server's capacity (docs/benchmark.md).

N requests are kept in flight, a new one sent as soon as one ends (no rounds, so no idle tail
counted as lost capacity). N doubles, 1, 2, 4, ..., while throughput grows by more than
`GROWTH`, up to a ceiling. At each N a warm-up lets every request sent before the change end;
then back-to-back time windows are measured until two agree within `SPREAD`. A window's
throughput counts each finished request's work pro rata of the part of its life inside the
window, so that a window of a few request latencies is exact for work done at a steady pace.

The best step is then measured once more, with longer windows (`confirm`): the step was chosen
because its figure was the highest, so on a noisy machine its own figure leans high; a fresh
measurement at the same N does not.
"""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pyworker.config import JSONObject
from pyworker.lifecycle.closed_loop import BudgetSpent, ClosedLoop, Completion, Send, prorata

logger = logging.getLogger(__name__)

GROWTH = 0.05
"""The ramp goes on while doubling N raises throughput by more than 5 %."""
SPREAD = 0.03
"""Two consecutive windows within 5 % of each other make a step's figure."""
MAX_WINDOWS = 6
"""Windows at most per step; an unsteady step takes their median."""
MIN_WINDOW = 0.02
WINDOW_LATENCIES = 3.0
WINDOW_REQUESTS = 12
"""A window lasts three mean request latencies, and long enough for twelve requests to end
(twelve latencies with one in flight), at least 20 ms: a fast server is done in well under a
second, a slow one measures over several requests (shorter windows on llama-server here
scattered by 20 % and more, enough to stop the ramp early)."""
FAILED_SHARE = 0.05
"""A step where more than 5 % of the requests fail ends the ramp and is not chosen."""
MAX_LATENCIES = 50_000
"""Latencies kept per step for its percentiles."""
CONFIRM_WINDOW_SCALE = 2.0
"""The confirming measurement's windows are twice a step's: half the noise of a window."""
CONFIRM_WINDOWS = 3
"""Windows at most when measuring the chosen N again: two that agree, else their median."""


@dataclass(slots=True)
class Step:
    """What one N in flight gave: a point of the capacity curve."""

    concurrency: int
    perf: float = 0.0
    p50: float = 0.0
    p90: float = 0.0
    p90_per_token: float | None = None
    """The 90th percentile of seconds per output token, where answers say their tokens."""
    requests: int = 0
    failed: int = 0
    windows: list[float] = field(default_factory=list)
    steady: bool = False
    """Two consecutive windows agreed within SPREAD."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "perf": self.perf,
            "p50": self.p50,
            "p90": self.p90,
            "p90_per_token": self.p90_per_token,
            "requests": self.requests,
            "failed": self.failed,
            "windows": len(self.windows),
            "steady": self.steady,
        }


@dataclass(frozen=True, slots=True)
class RampSettings:
    ceiling: int
    deadline: float
    """time.monotonic() past which the ramp ends with the best figure so far."""
    latency_limit: float | None = None
    declared: int | None = None
    """The engine's own limit of sequences at once, measured as a step of its own."""
    token_latency_limit: float | None = None
    """The p90 seconds per output token a step may reach (LLM routes)."""


@dataclass(slots=True)
class RampOutcome:
    steps: list[Step]
    chosen: Step | None
    stopped: str
    """Why the ramp ended, in words."""
    confirmed: Step | None = None
    """The chosen N measured again: its figure is the capacity (None: no time was left)."""

    @property
    def perf(self) -> float:
        """The capacity: the confirming measurement's figure, else the chosen step's."""
        if self.confirmed is not None and self.confirmed.windows:
            return self.confirmed.perf
        return self.chosen.perf if self.chosen is not None else 0.0


def concurrency_steps(ceiling: int, declared: int | None = None) -> Iterator[int]:
    """1, 2, 4, ... below the ceiling, the engine's `declared` limit, then the ceiling."""
    levels = {ceiling}
    concurrency = 1
    while concurrency < ceiling:
        levels.add(concurrency)
        concurrency *= 2
    if declared is not None and declared < ceiling:
        levels.add(declared)
    yield from sorted(levels)


async def ramp(send: Send, payloads: Iterator[JSONObject], settings: RampSettings) -> RampOutcome:
    loop = ClosedLoop(send, payloads)
    steps: list[Step] = []
    best: Step | None = None
    stopped = f"reached the ceiling of {settings.ceiling} in flight"
    try:
        for concurrency in concurrency_steps(settings.ceiling, settings.declared):
            step = await measure_step(loop, concurrency, settings, first=best is None)
            if step.windows:
                steps.append(step)
                log_step(step, loop.last_error)
            verdict, best = judge(step, best, settings, steps[-2:-1])
            if verdict:
                stopped = verdict
                break
        # One step is no choice: its figure is not the highest of several, nothing to undo.
        confirmed = await confirm(loop, best, settings) if len(steps) > 1 else None
    finally:
        await loop.close()
    return RampOutcome(steps, best, stopped, confirmed)


async def confirm(loop: ClosedLoop, chosen: Step | None, settings: RampSettings) -> Step | None:
    """The chosen N measured again with longer windows, within what is left of the budget;
    None when too little is left for two windows as long as the step's own (shorter ones
    would scatter more than the figure they replace)."""
    if chosen is None:
        return None
    n = chosen.concurrency
    window = chosen.p50 * max(WINDOW_LATENCIES, WINDOW_REQUESTS / n)
    if settings.deadline - time.monotonic() < 2 * window or time.monotonic() >= settings.deadline:
        logger.info("benchmark: no time left to measure %d in flight again", n)
        return None
    step = await measure_step(
        loop, n, settings, scale=CONFIRM_WINDOW_SCALE, max_windows=CONFIRM_WINDOWS
    )
    if not step.windows or step.failed > FAILED_SHARE * max(step.requests, 1):
        return None
    logger.info(
        "benchmark: %d in flight again: %.2f/s over %d windows%s",
        step.concurrency,
        step.perf,
        len(step.windows),
        "" if step.steady else " (windows did not agree)",
    )
    return step


def judge(
    step: Step, best: Step | None, settings: RampSettings, before: list[Step]
) -> tuple[str, Step | None]:
    """Why the ramp ends after `step` ("" to go on), and the best step so far.

    A step that did not grow ends the ramp only when the step `before` it did not grow
    either: on a batching engine one flat doubling is often noise, or the edge of a plateau
    before the next rise (measured on llama-server: 4 -> 8 in flight +3 %, 8 -> 16 +9 %).
    """
    n = step.concurrency
    if not step.windows:
        return "time budget spent", best
    if step.failed > FAILED_SHARE * max(step.requests, 1):
        return f"{step.failed} of {step.requests} requests failed at {n} in flight", best
    over = over_latency_limit(step, settings)
    if over:
        if best is None:
            return f"{over} even at 1", step
        return f"{over} at {n} in flight", best
    grew = best is None or step.perf > best.perf * (1 + GROWTH)
    stalled_before = bool(before) and before[0] is not best
    if best is None or step.perf > best.perf:
        best = step
    if not grew and (stalled_before or n >= settings.ceiling):
        return f"throughput stopped growing at {n} in flight", best
    if time.monotonic() >= settings.deadline:
        return "time budget spent", best
    if n >= settings.ceiling:
        return f"reached the ceiling of {settings.ceiling} in flight", best
    return "", best


def over_latency_limit(step: Step, settings: RampSettings) -> str:
    """Which latency limit `step` goes over, in words ("" for none)."""
    limit = settings.latency_limit
    if limit is not None and step.p90 > limit:
        return f"p90 latency {step.p90:.3g} s over the limit {limit:g} s"
    limit, per_token = settings.token_latency_limit, step.p90_per_token
    if limit is not None and per_token is not None and per_token > limit:
        return f"p90 time per output token {per_token:.3g} s over the limit {limit:g} s"
    return ""


async def measure_step(
    loop: ClosedLoop,
    concurrency: int,
    settings: RampSettings,
    first: bool = False,
    scale: float = 1.0,
    max_windows: int = MAX_WINDOWS,
) -> Step:
    """Warm up at `concurrency`, then measure windows until two agree or the budget ends.

    The `first` step with a figure measures one window whatever the budget, so that a model
    slower than the budget (minutes a job) still gets a figure; windows then shrink to fit.
    """
    step = Step(concurrency)
    changed = time.monotonic()
    loop.resize(concurrency)
    latencies: list[float] = []
    per_token: list[float] = []
    patient = math.inf if first else settings.deadline
    try:
        await loop.wait_until_started_after(changed, patient, one_ended=True)
        warm = [r.ended - r.started for r in loop.records if r.ended >= changed]
        latency = statistics.fmean(warm or [0.0])
        wanted = scale * latency * max(WINDOW_LATENCIES, WINDOW_REQUESTS / concurrency)
        left = (settings.deadline - time.monotonic()) / 3
        window = max(MIN_WINDOW * scale, min(wanted, left))
        start = time.monotonic()
        loop.records = [r for r in loop.records if r.ended > start]
        while len(step.windows) < max_windows:
            end = start + window
            await asyncio.sleep(max(0.0, end - time.monotonic()))
            await loop.wait_until_started_after(end, settings.deadline if step.windows else patient)
            step.windows.append(prorata(loop.records, start, end))
            _count(step, loop.records, end, latencies, per_token)
            loop.records = [r for r in loop.records if r.ended > end]
            if _agree(step.windows) or step.failed > FAILED_SHARE * max(step.requests, 1):
                break
            if time.monotonic() >= settings.deadline:
                break
            start = end
    except BudgetSpent:
        pass
    _summarise(step, latencies, per_token)
    return step


def _count(
    step: Step,
    records: list[Completion],
    end: float,
    latencies: list[float],
    per_token: list[float],
) -> None:
    for record in records:
        if record.ended > end:
            continue
        step.requests += 1
        if record.work is None:
            step.failed += 1
        elif len(latencies) < MAX_LATENCIES:
            latencies.append(record.ended - record.started)
            seconds = record.per_token
            if seconds is not None:
                per_token.append(seconds)


def _agree(windows: list[float]) -> bool:
    if len(windows) < 2:
        return False
    low, high = sorted(windows[-2:])
    return high > 0 and (high - low) <= SPREAD * high


def _summarise(step: Step, latencies: list[float], per_token: list[float]) -> None:
    if step.windows:
        step.steady = _agree(step.windows)
        step.perf = (
            statistics.fmean(step.windows[-2:]) if step.steady else statistics.median(step.windows)
        )
    if latencies:
        step.p50 = _percentile(latencies, 0.5)
        step.p90 = _percentile(latencies, 0.9)
    if per_token:
        step.p90_per_token = _percentile(per_token, 0.9)


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def log_step(step: Step, last_error: str) -> None:
    logger.info(
        "benchmark: %d in flight: %.2f/s, p50 %.3f s, p90 %.3f s, %d requests%s%s",
        step.concurrency,
        step.perf,
        step.p50,
        step.p90,
        step.requests,
        f", {step.failed} failed" if step.failed else "",
        "" if step.steady else " (windows did not agree)",
    )
    if step.failed and last_error:
        logger.info("benchmark: last failure at %d in flight: %s", step.concurrency, last_error)
