"""The figures of a run, the issue's targets, and the Markdown table that shows both."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.probes import SlowBatch
from pyworker.backports import StrEnum

MiB = 1024 * 1024
THROUGHPUT_TARGET = 1.0
ADDED_P50_TARGET = 1.2
SLOW_TARGET = 1.25
IDLE_RSS_TARGET_MIB = 45.0
SATURATED = 0.9


class Subject(StrEnum):
    DIRECT = "direct"
    BARE = "bare"
    PYWORKER = "pyworker"


TITLES = {
    Subject.DIRECT: "model direct",
    Subject.BARE: "bare aiohttp proxy",
    Subject.PYWORKER: "pyworker",
}


@dataclass
class Figures:
    """One subject's measurements, one entry per round."""

    requests_per_second: list[float] = field(default_factory=list)
    errors: list[int] = field(default_factory=list)
    cpu_ms_per_request: list[float] = field(default_factory=list)
    core_busy: list[float] = field(default_factory=list)
    """The server's CPU seconds per second of the 64-connection run: under 1 means it did not
    have its core to itself (another process on it) or the generator could not keep up."""
    p50_ms: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    fixed_rate: list[float] = field(default_factory=list)
    head_to_head: list[float] = field(default_factory=list)
    """Requests/s while both proxies share one core under equal load (`run.head_to_head`)."""
    machine_busy: list[float] = field(default_factory=list)
    """Percent of the machine others kept busy just before this subject's round."""
    first_chunk_ms: list[float] = field(default_factory=list)
    rss_idle: int = 0
    rss_peak: list[int] = field(default_factory=list)
    rss_peak_slow: list[int] = field(default_factory=list)
    slow: list[SlowBatch] = field(default_factory=list)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def added(subject: Figures, direct: Figures, attribute: str) -> float:
    """Median over rounds of (subject - direct), each round against its own direct run."""
    pairs = zip(getattr(subject, attribute), getattr(direct, attribute), strict=False)
    return median([mine - theirs for mine, theirs in pairs])


class Verdict(StrEnum):
    PASS = "PASS"
    FAIL = "FAIL"
    NA = "n/a"


@dataclass(slots=True)
class Target:
    name: str
    measured: str
    verdict: Verdict


def evaluate(figures: dict[Subject, Figures]) -> list[Target]:
    direct, bare, worker = figures[Subject.DIRECT], figures[Subject.BARE], figures[Subject.PYWORKER]
    targets: list[Target] = []

    ratio, saturated = throughput_ratio(worker, bare)
    shared = head_to_head_ratio(worker, bare)
    rounds = len(worker.requests_per_second)
    if saturated:
        measured = (
            f"{ratio:.2f}x (median of per-round ratios, over the {saturated} of {rounds} "
            f"rounds where both proxies kept their core busy); head to head {shared:.2f}x"
        )
        verdict = _verdict(ratio >= THROUGHPUT_TARGET and not any(worker.errors), ratio)
    else:
        measured = (
            f"head to head {shared:.2f}x (no separate round had both proxies saturating "
            f"their core: the machine was busy; separate rounds gave {ratio:.2f}x)"
        )
        verdict = _verdict(shared >= THROUGHPUT_TARGET and not any(worker.errors), shared)
    targets.append(
        Target(f"throughput >= {THROUGHPUT_TARGET:.1f}x the bare proxy's", measured, verdict)
    )
    worker_added, bare_added = added(worker, direct, "p50_ms"), added(bare, direct, "p50_ms")
    latency_ratio = worker_added / bare_added if bare_added > 0 else math.nan
    passed = worker_added <= ADDED_P50_TARGET * max(bare_added, 0.0)
    targets.append(
        Target(
            f"added p50 latency <= {ADDED_P50_TARGET}x the bare proxy's",
            f"{worker_added:.3f} ms vs {bare_added:.3f} ms ({latency_ratio:.2f}x)",
            _verdict(passed, worker_added),
        )
    )
    worst = max((batch.max_ratio for batch in worker.slow), default=math.nan)
    all_ok = bool(worker.slow) and all(batch.succeeded == batch.count for batch in worker.slow)
    targets.append(
        Target(
            f"every slow request succeeds within {SLOW_TARGET}x the model's time, every round",
            f"{_slow_cell(worker.slow)}; worst {worst:.3f}x",
            _verdict(all_ok and worst <= SLOW_TARGET, worst),
        )
    )
    idle = worker.rss_idle / MiB
    targets.append(
        Target(
            f"idle RSS <= {IDLE_RSS_TARGET_MIB:.0f} MiB",
            f"{idle:.1f} MiB",
            _verdict(idle <= IDLE_RSS_TARGET_MIB, idle),
        )
    )
    return targets


def throughput_ratio(worker: Figures, bare: Figures) -> tuple[float, int]:
    """pyworker's requests/s over the bare proxy's, round by round, counting only rounds in
    which both were the bottleneck (core busy >= SATURATED); with none, over every round."""
    rounds = list(
        zip(
            worker.requests_per_second,
            bare.requests_per_second,
            worker.core_busy,
            bare.core_busy,
            strict=False,
        )
    )
    saturated = [mine / theirs for mine, theirs, a, b in rounds if min(a, b) >= SATURATED]
    if saturated:
        return median(saturated), len(saturated)
    return median([mine / theirs for mine, theirs, _, _ in rounds]), 0


def head_to_head_ratio(worker: Figures, bare: Figures) -> float:
    pairs = zip(worker.head_to_head, bare.head_to_head, strict=False)
    return median([mine / theirs for mine, theirs in pairs if theirs > 0])


def _verdict(passed: bool, value: float) -> Verdict:
    if math.isnan(value):
        return Verdict.NA
    return Verdict.PASS if passed else Verdict.FAIL


def _slow_cell(batches: list[SlowBatch]) -> str:
    if not batches:
        return "-"
    succeeded = sum(batch.succeeded for batch in batches)
    total = sum(batch.count for batch in batches)
    return f"{succeeded}/{total} ok"


def _number(value: float, digits: int = 1) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


def render(
    figures: dict[Subject, Figures],
    rounds: int,
    slow_count: int,
    slow_seconds: float,
    rate: float,
) -> str:
    """The figures table (medians over rounds) and the targets table, in Markdown."""
    direct = figures[Subject.DIRECT]
    subjects = list(Subject)
    rows: list[tuple[str, list[str]]] = []

    def row(name: str, cell: Callable[[Figures, Subject], str]) -> None:
        rows.append((name, [cell(figures[subject], subject) for subject in subjects]))

    row("requests/s at 64 connections", lambda f, s: _number(median(f.requests_per_second), 0))
    row("errors at 64 connections", lambda f, s: str(sum(f.errors)))
    row(
        "server CPU ms per request (64 conns)",
        lambda f, s: _number(median(f.cpu_ms_per_request), 3),
    )
    row(
        "head to head, one shared core, 32 connections each: requests/s",
        lambda f, s: "-" if s is Subject.DIRECT else _number(median(f.head_to_head), 0),
    )
    row(
        "requests per server CPU-second (64 conns)",
        lambda f, s: _number(1000.0 / median(f.cpu_ms_per_request), 0),
    )
    row(
        "server core busy at 64 connections (%)",
        lambda f, s: _number(100.0 * median(f.core_busy), 0),
    )
    row(f"p50 latency at ~{rate:.0f} req/s (ms)", lambda f, s: _number(median(f.p50_ms), 3))
    row(f"p99 latency at ~{rate:.0f} req/s (ms)", lambda f, s: _number(median(f.p99_ms), 3))
    row(
        "added p50 latency (ms)",
        lambda f, s: "-" if s is Subject.DIRECT else _number(added(f, direct, "p50_ms"), 3),
    )
    row(
        "added p99 latency (ms)",
        lambda f, s: "-" if s is Subject.DIRECT else _number(added(f, direct, "p99_ms"), 3),
    )
    row("stream: time to first chunk (ms)", lambda f, s: _number(median(f.first_chunk_ms), 3))
    row(
        "stream: added time to first chunk (ms)",
        lambda f, s: "-" if s is Subject.DIRECT else _number(added(f, direct, "first_chunk_ms"), 3),
    )
    row("RSS idle (MiB)", lambda f, s: _number(f.rss_idle / MiB))
    row(
        "RSS peak at 64 connections, first round (MiB)",
        lambda f, s: _number(f.rss_peak[0] / MiB if f.rss_peak else math.nan),
    )
    row(
        f"RSS peak with {slow_count} in flight (MiB)",
        lambda f, s: _number(max(f.rss_peak_slow, default=0) / MiB),
    )
    row(f"{slow_count} x {slow_seconds:g} s requests: succeeded", lambda f, s: _slow_cell(f.slow))
    row(
        f"{slow_count} x {slow_seconds:g} s: worst max latency / {slow_seconds:g} s",
        lambda f, s: _number(max((b.max_ratio for b in f.slow), default=math.nan), 3),
    )
    row(
        f"{slow_count} x {slow_seconds:g} s: client done sending (s, worst)",
        lambda f, s: _number(max((b.sent_seconds for b in f.slow), default=math.nan), 3),
    )

    lines = [
        f"Figures (median of {rounds} interleaved round{'s' if rounds != 1 else ''}; "
        "model-direct figures are the fake model's own):",
        "",
        "| figure | " + " | ".join(TITLES[s] for s in subjects) + " |",
        "|---|" + "---:|" * len(subjects),
    ]
    lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows]
    lines += ["", "Targets (pyworker, every signature verified, accounting on):", ""]
    lines += ["| target | measured | result |", "|---|---|---|"]
    lines += [f"| {t.name} | {t.measured} | {t.verdict} |" for t in evaluate(figures)]
    return "\n".join(lines)
