"""What the local autoscaler knows of its workers, and which one gets the next request.

Each worker is known by its latest `/worker_status/` report plus a bounded history of the
figures worth charting. Its state is derived from the latest report alone, as the autoscaler
does: ready once it reports `max_perf > 0` and `loadtime > 0` with no `error_msg`. A worker
that had loaded but reports no perf any more is *draining*, and one silent for `stale_after`
seconds is *stale*: neither gets requests.

Between two reports the fleet adds the cost of the requests it routed to a worker to that
worker's reported load, so a burst is spread over the fleet instead of all landing on whichever
worker looked idlest at its last report.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from pyworker.backports import StrEnum
from pyworker.protocol.messages import DeleteRequests, WorkerStatusReport

logger = logging.getLogger(__name__)

KNOWN_OUTCOMES = frozenset({"Success", "Error", "Cancelled", "Rejected", "SessionActive"})
HISTORY_FIELDS = ("time", "cur_load", "max_perf", "cur_perf", "num_requests_working")
_RECENT_FINISHED = 20


class WorkerPhase(StrEnum):
    LOADING = "loading"
    READY = "ready"
    ERRORED = "errored"
    DRAINING = "draining"  # was ready (loadtime > 0) and now offers no perf: stopping
    STALE = "stale"


@dataclass(frozen=True, slots=True)
class Sample:
    time: float  # epoch seconds
    cur_load: float
    max_perf: float
    cur_perf: float
    num_requests_working: int


@dataclass(frozen=True, slots=True)
class FinishedRequest:
    worker_id: int
    request_idx: int
    success: bool
    status: str
    entered_queue_at: float | None
    work_started_at: float | None
    work_completed_at: float | None
    received_at: float  # epoch seconds


class WorkerRecord:
    """One worker: its latest report (without its token), history, and routing bookkeeping."""

    def __init__(self, worker_id: int, history_size: int, now: float) -> None:
        self.id = worker_id
        self.report = WorkerStatusReport(id=worker_id)
        self.raw_report: dict[str, Any] = {}
        self.history: deque[Sample] = deque(maxlen=history_size)
        self.first_seen = now
        self.reported_at = now  # monotonic
        self.reports = 0
        self.routed = 0
        self.pending_load = 0.0  # cost routed here since the latest report
        self.pending_requests = 0
        self.last_routed_at = 0.0
        self.outcomes: Counter[str] = Counter()

    def update(
        self, report: WorkerStatusReport, raw: dict[str, Any], now: float, wall: float
    ) -> None:
        self.report = report
        self.raw_report = {key: value for key, value in raw.items() if key != "mtoken"}
        self.reported_at = now
        self.reports += 1
        self.pending_load = 0.0
        self.pending_requests = 0
        self.history.append(
            Sample(
                time=wall,
                cur_load=report.cur_load,
                max_perf=report.max_perf,
                cur_perf=report.cur_perf,
                num_requests_working=report.num_requests_working,
            )
        )

    def phase(self, now: float, stale_after: float | None) -> WorkerPhase:
        if stale_after is not None and now - self.reported_at > stale_after:
            return WorkerPhase.STALE
        report = self.report
        if report.error_msg:
            return WorkerPhase.ERRORED
        if report.loadtime > 0:
            return WorkerPhase.READY if report.max_perf > 0 else WorkerPhase.DRAINING
        return WorkerPhase.LOADING

    def routing_key(self) -> tuple[float, int, float, int]:
        """Least load per unit of perf first; then fewest requests in progress; then idlest."""
        load = (self.report.cur_load + self.pending_load) / self.report.max_perf
        working = self.report.num_requests_working + self.pending_requests
        return (load, working, self.last_routed_at, self.id)

    def snapshot(
        self, now: float, stale_after: float | None, history: int | None
    ) -> dict[str, Any]:
        report = self.report
        samples = list(self.history)
        if history is not None:
            samples = samples[len(samples) - history :] if history > 0 else []
        return {
            "id": self.id,
            "url": report.url,
            "state": self.phase(now, stale_after).value,
            "error_msg": report.error_msg or "",
            "version": report.version,
            "loadtime": report.loadtime,
            "cur_load": report.cur_load,
            "max_perf": report.max_perf,
            "cur_perf": report.cur_perf,
            "num_requests_working": report.num_requests_working,
            "seconds_since_report": round(now - self.reported_at, 3),
            "reports": self.reports,
            "routed": self.routed,
            "pending_load": self.pending_load,
            "finished": dict(self.outcomes),
            "last_report": self.raw_report,
            "history": {
                field: [getattr(sample, field) for sample in samples] for field in HISTORY_FIELDS
            },
        }


class Fleet:
    """All workers of the endpoint, plus a bounded log of finished requests."""

    def __init__(
        self,
        *,
        history_size: int = 600,
        finished_size: int = 10_000,
        max_workers: int = 256,
        stale_after: float | None = 30.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.workers: dict[int, WorkerRecord] = {}
        self.finished: deque[FinishedRequest] = deque(maxlen=finished_size)
        self.outcomes: Counter[str] = Counter()
        self.stale_after = stale_after
        self._history_size = history_size
        self._max_workers = max_workers
        self._clock = clock
        self._wall_clock = wall_clock

    def record_status(self, report: WorkerStatusReport, raw: dict[str, Any]) -> WorkerRecord:
        now = self._clock()
        record = self.workers.get(report.id)
        if record is None:
            self._make_room()
            record = self.workers[report.id] = WorkerRecord(report.id, self._history_size, now)
            logger.info("worker %d reports from %s", report.id, report.url or "(no url)")
        before = self.phase(record) if record.reports else None
        record.update(report, raw, now, self._wall_clock())
        after = self.phase(record)
        if after is not before:
            logger.info("worker %d is %s", report.id, after.value)
        return record

    def record_finished(self, body: DeleteRequests) -> list[FinishedRequest]:
        received = self._wall_clock()
        if body.requests is not None:
            entries = [
                FinishedRequest(
                    worker_id=body.worker_id,
                    request_idx=item.request_idx,
                    success=item.success,
                    status=_outcome(item.status, item.success),
                    entered_queue_at=item.entered_queue_at,
                    work_started_at=item.work_started_at,
                    work_completed_at=item.work_completed_at,
                    received_at=received,
                )
                for item in body.requests
            ]
        else:
            entries = [
                FinishedRequest(
                    worker_id=body.worker_id,
                    request_idx=request_idx,
                    success=body.success,
                    status=_outcome("", body.success),
                    entered_queue_at=None,
                    work_started_at=None,
                    work_completed_at=None,
                    received_at=received,
                )
                for request_idx in body.request_idxs or []
            ]
        record = self.workers.get(body.worker_id)
        for entry in entries:
            self.finished.append(entry)
            self.outcomes[entry.status] += 1
            if record is not None:
                record.outcomes[entry.status] += 1
        return entries

    def phase(self, record: WorkerRecord) -> WorkerPhase:
        return record.phase(self._clock(), self.stale_after)

    def phase_counts(self) -> dict[WorkerPhase, int]:
        counts = dict.fromkeys(WorkerPhase, 0)
        for record in self.workers.values():
            counts[self.phase(record)] += 1
        return counts

    def choose(self, cost: float) -> WorkerRecord | None:
        """The ready worker to route to, charged with `cost` until its next report."""
        ready = [
            record for record in self.workers.values() if self.phase(record) is WorkerPhase.READY
        ]
        if not ready:
            return None
        chosen = min(ready, key=WorkerRecord.routing_key)
        chosen.routed += 1
        chosen.pending_load += cost
        chosen.pending_requests += 1
        chosen.last_routed_at = self._clock()
        return chosen

    def snapshot(self, history: int | None = None) -> dict[str, Any]:
        now = self._clock()
        recent = list(self.finished)[-_RECENT_FINISHED:]
        return {
            "time": self._wall_clock(),
            "counts": {phase.value: count for phase, count in self.phase_counts().items()},
            "workers": [
                record.snapshot(now, self.stale_after, history)
                for record in sorted(self.workers.values(), key=lambda record: record.id)
            ],
            "finished": {
                "total": sum(self.outcomes.values()),
                "by_status": dict(self.outcomes),
                "recent": [asdict(entry) for entry in reversed(recent)],
            },
        }

    def _make_room(self) -> None:
        while len(self.workers) >= self._max_workers:
            oldest = min(self.workers.values(), key=lambda record: record.reported_at)
            del self.workers[oldest.id]
            logger.info("forgetting worker %d: too many workers", oldest.id)


def _outcome(status: str, success: bool) -> str:
    """A bounded set of counter keys: the protocol's statuses, else Success/Error/Other."""
    if not status:
        return "Success" if success else "Error"
    return status if status in KNOWN_OUTCOMES else "Other"
