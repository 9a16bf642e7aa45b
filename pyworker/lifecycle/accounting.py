"""Per-request accounting: what `/worker_status/` and `/delete_requests/` need, in bounded space.

Only requests that passed the signature check enter the ledger, so nobody without a valid
auth_data can change the load or the request ids the worker reports. Loads are summed in exact
integer units (pyworker.protocol.workload), so they never drift below zero or away from it.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from pyworker.backports import StrEnum
from pyworker.protocol.messages import FinishedItem
from pyworker.protocol.workload import WorkloadTotal, units_to_workload, workload_units


class Outcome(StrEnum):
    """How a request ended; the values are the wire protocol's words."""

    SUCCESS = "Success"
    ERROR = "Error"
    CANCELLED = "Cancelled"
    REJECTED = "Rejected"


logger = logging.getLogger(__name__)


@dataclass(slots=True)
class RequestRecord:
    request_idx: int
    route: str
    workload: float
    received_at: float
    started_at: float | None = None
    finished_at: float | None = None
    outcome: Outcome | None = None
    status: int = 0
    serial: int = 0

    def finished_item(self) -> FinishedItem:
        """The `/delete_requests/` item for this request (times in epoch seconds)."""
        received = self.received_at
        return FinishedItem(
            request_idx=self.request_idx,
            success=self.outcome is Outcome.SUCCESS,
            status=str(self.outcome),
            entered_queue_at=received,
            work_started_at=self.started_at or received,
            work_completed_at=self.finished_at or received,
        )


@dataclass(slots=True)
class Interval:
    """Counters since the last successful status report; loads in exact units."""

    new_units: int = 0
    rejected_units: int = 0
    served_units: int = 0
    received: int = 0
    by_outcome: dict[Outcome, int] = field(default_factory=dict)

    @property
    def new_load(self) -> float:
        """Workload received minus cancelled (negative when more was cancelled than came)."""
        return units_to_workload(self.new_units)

    @property
    def rejected_load(self) -> float:
        return units_to_workload(self.rejected_units)

    @property
    def served_load(self) -> float:
        return units_to_workload(self.served_units)


class Ledger:
    """Requests in progress, interval counters, and finished requests awaiting their report."""

    def __init__(
        self,
        max_finished: int = 10_000,
        observer: Callable[[RequestRecord], None] | None = None,
    ) -> None:
        self.observer = observer
        self._in_progress: dict[int, RequestRecord] = {}
        self._finished: deque[RequestRecord] = deque(maxlen=max_finished)
        self._serials = itertools.count(1)
        self._interval = Interval()
        self._current = WorkloadTotal()
        self.dropped_finished = 0
        self.totals: dict[Outcome, int] = dict.fromkeys(Outcome, 0)

    # --- the request path -------------------------------------------------------------
    def receive(self, request_idx: int, route: str, workload: float) -> RequestRecord:
        record = RequestRecord(
            request_idx, route, workload, time.time(), serial=next(self._serials)
        )
        self._in_progress[record.serial] = record
        self._current.add(workload)
        self._interval.new_units += workload_units(workload)
        self._interval.received += 1
        return record

    def start(self, record: RequestRecord) -> None:
        record.started_at = time.time()

    def finish(self, record: RequestRecord, outcome: Outcome, status: int) -> None:
        if self._in_progress.pop(record.serial, None) is None:
            return  # already finished: each request is accounted once
        self._current.remove(record.workload)
        if outcome is Outcome.CANCELLED:
            self._interval.new_units -= workload_units(record.workload)
        elif outcome is Outcome.SUCCESS:
            self._interval.served_units += workload_units(record.workload)
        self._close(record, outcome, status)

    def reject(self, request_idx: int, route: str, workload: float, status: int) -> None:
        """A signed request turned away (429): counted as rejected load, reported as Rejected."""
        record = RequestRecord(
            request_idx, route, workload, time.time(), serial=next(self._serials)
        )
        self._interval.rejected_units += workload_units(workload)
        self._interval.received += 1
        self._close(record, Outcome.REJECTED, status)

    def _close(self, record: RequestRecord, outcome: Outcome, status: int) -> None:
        record.finished_at = time.time()
        record.outcome = outcome
        record.status = status
        self.totals[outcome] += 1
        counts = self._interval.by_outcome
        counts[outcome] = counts.get(outcome, 0) + 1
        if len(self._finished) == self._finished.maxlen:
            self.dropped_finished += 1
        self._finished.append(record)
        if self.observer is not None:
            self.observer(record)

    # --- what the reporter reads ------------------------------------------------------
    @property
    def current_load(self) -> float:
        """Workload of the requests and sessions in progress; exactly 0 when none is."""
        return self._current.value

    @property
    def in_progress(self) -> int:
        return len(self._in_progress)

    def working_request_idxs(self) -> list[int]:
        return [record.request_idx for record in self._in_progress.values()]

    def interval(self) -> Interval:
        """A copy of the interval counters, to send; pass it to `commit_interval` once sent."""
        return replace(self._interval, by_outcome=dict(self._interval.by_outcome))

    def commit_interval(self, sent: Interval) -> None:
        """Subtract what was reported, keeping what arrived while the report was in flight."""
        current = self._interval
        current.new_units -= sent.new_units
        current.rejected_units -= sent.rejected_units
        current.served_units -= sent.served_units
        current.received -= sent.received
        for outcome, count in sent.by_outcome.items():
            current.by_outcome[outcome] = current.by_outcome.get(outcome, 0) - count

    def restore_interval(self, unsent: Interval) -> None:
        """Add back counters consumed by a report that certainly did not arrive."""
        current = self._interval
        current.new_units += unsent.new_units
        current.rejected_units += unsent.rejected_units
        current.served_units += unsent.served_units
        current.received += unsent.received
        for outcome, count in unsent.by_outcome.items():
            current.by_outcome[outcome] = current.by_outcome.get(outcome, 0) + count

    def take_finished(self, limit: int = 1000) -> list[RequestRecord]:
        taken: list[RequestRecord] = []
        while self._finished and len(taken) < limit:
            taken.append(self._finished.popleft())
        return taken

    def return_finished(self, records: list[RequestRecord]) -> None:
        """Put back records whose report failed, oldest first, within the bound."""
        room = (self._finished.maxlen or 0) - len(self._finished)
        if len(records) > room:
            self.dropped_finished += len(records) - room
            records = records[len(records) - room :] if room > 0 else []
        self._finished.extendleft(reversed(records))

    @property
    def finished_waiting(self) -> int:
        return len(self._finished)
