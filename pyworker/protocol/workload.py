"""Workload: the unit the autoscaler balances load in, its bounds, and exact sums of it.

Every workload the worker accounts is a finite number from 0 to `MAX_WORKLOAD` (a route may set
a lower `max_workload`): one that is not is refused with 422 where it enters (docs/input.md), so
no load, metric or report can hold inf, NaN or a negative number.

Sums of workloads (the load in progress, a route's queue, a report's interval) are kept as whole
millionths in Python integers rather than in floats: adding and then removing the same
workloads, in any order and of any sizes, comes back to exactly zero. Float sums do not
(1e16 + 1 - 1e16 - 1 is -1), and a load left at -1 or 1e-9 with nothing running is a lie the
autoscaler acts on.
"""

from __future__ import annotations

import math
from typing import Any, Final

MAX_WORKLOAD: Final = 1_000_000_000.0
"""The most workload one request or session may carry (its `cost` included)."""
UNITS_PER_WORKLOAD: Final = 1_000_000
"""Sums are exact to a millionth of a workload unit."""


class WorkloadError(ValueError):
    """A request's workload is unusable; `fields` names where it came from, as the 422 says."""

    def __init__(self, problem: str, section: str, field: str | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.section = section
        self.field = field

    def fields(self) -> dict[str, Any]:
        """The 422 body's field part: `{"payload": {"max_tokens": "..."}}`."""
        return {self.section: self.problem if self.field is None else {self.field: self.problem}}


def check_workload(value: object, cap: float = MAX_WORKLOAD) -> float:
    """`value` as a workload; ValueError saying why it is not one (booleans are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a number")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not (math.isfinite(number) and 0 <= number <= cap):
        raise ValueError(f"must be a finite number from 0 to {cap:g}")
    return number + 0.0  # -0.0 is 0


def workload_units(workload: float) -> int:
    """`workload` in whole millionths; the same workload always gives the same integer."""
    return round(workload * UNITS_PER_WORKLOAD)


def units_to_workload(units: int) -> float:
    return units / UNITS_PER_WORKLOAD


class WorkloadTotal:
    """A running sum of workloads that returns to exactly zero when all that came has gone."""

    __slots__ = ("units",)

    def __init__(self) -> None:
        self.units = 0

    def add(self, workload: float) -> None:
        self.units += workload_units(workload)

    def remove(self, workload: float) -> None:
        self.units -= workload_units(workload)

    @property
    def value(self) -> float:
        return units_to_workload(self.units)
