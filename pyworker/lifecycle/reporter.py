"""Pushing the worker's state to the autoscaler: `/worker_status/` and `/delete_requests/`.

A status report goes out at once on a state change, about every second while something
changed, and at least every `idle_interval` seconds otherwise.

What the autoscaler receives is counted once (docs/reporting.md):

- `/worker_status/` carries deltas (`new_load`, `rej_load`, `cur_perf`,
  `num_requests_recieved`) that the autoscaler adds up, and it has no way to recognise a
  report it has seen. So a delta is consumed when it is sent: a report that times out, or
  is answered with an error, may have been recorded, and is never sent again. A report that
  certainly did not arrive (no connection, or 503/429: "not handled now") keeps its delta
  for the next one. After a report whose fate is unknown the reporter sends empty deltas
  until one is acknowledged, keeping the rest meanwhile: an outage loses at most the one
  interval that was in flight when it began, and never counts one twice.
- `/delete_requests/` is retried until acknowledged, across addresses; the autoscaler treats
  it by `request_idx`, so a repeat after a lost answer is harmless.
- A redirect is never followed (reports carry `MASTER_TOKEN`), and an answer is read only up
  to a small bound (pyworker.lifecycle.outbound): a 3xx is a report not delivered, sent again
  to the next address.
- One report of each kind is in flight at a time, the drain's final one included, and each
  attempt may take `attempt_timeout` seconds (an autoscaler under load answers slowly).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import Callable
from enum import Enum
from typing import Any

import aiohttp
import orjson

from pyworker import __version__
from pyworker.config.environment import Environment
from pyworker.lifecycle import outbound
from pyworker.lifecycle.accounting import Interval, Ledger
from pyworker.lifecycle.state import WorkerStatus
from pyworker.lifecycle.supervision import run_all
from pyworker.protocol.messages import (
    DELETE_REQUESTS_PATH,
    STATUS_PATH,
    DeleteRequests,
    WorkerStatusReport,
)

logger = logging.getLogger(__name__)

GB = 1e9
REPORT_TIMEOUT = 8.0
"""Seconds one report may take to be answered (the reference waits 3, too little under load)."""
NOT_HANDLED = frozenset({429, 503})
"""Answers that say the report was not handled: it is sent again."""


class Delivery(Enum):
    """What became of one report."""

    ACKNOWLEDGED = "acknowledged"
    NOT_DELIVERED = "not delivered"
    """Certainly not recorded: no connection, or an answer saying it was not handled."""
    UNKNOWN = "unknown"
    """Perhaps recorded: a timeout, a dropped answer, or an error answer."""


def disk_used_bytes(path: str = "/") -> int:
    return shutil.disk_usage(path).used


class Reporter:
    def __init__(
        self,
        environment: Environment,
        status: WorkerStatus,
        ledger: Ledger,
        url: Callable[[], str],
        *,
        busy_interval: float = 1.0,
        idle_interval: float = 10.0,
        attempt_timeout: float = REPORT_TIMEOUT,
        attempts_per_address: int = 2,
        disk_path: str = "/",
    ) -> None:
        self.addresses = environment.report_addr
        self.worker_id = environment.container_id
        token = environment.master_token
        self._mtoken = token.get_secret_value() if token else ""
        self.status = status
        self.ledger = ledger
        self.url = url
        self.sent_reports = 0
        self.failed_reports = 0
        self.failed_deletes = 0
        self.last_report: dict[str, Any] | None = None
        self.busy_interval = busy_interval
        self.idle_interval = idle_interval
        self._retry_delay = busy_interval
        self._last_sent_at = 0.0
        self._last_signature: tuple[Any, ...] | None = None
        self.attempt_timeout = attempt_timeout
        self.attempts_per_address = attempts_per_address
        self._session: aiohttp.ClientSession | None = None
        self._in_doubt = False
        """The last status report's fate is unknown: deltas wait until one is acknowledged."""
        self.disk_path = disk_path
        self._disk_baseline: int | None = None
        self._status_lock = asyncio.Lock()
        self._finished_lock = asyncio.Lock()

    async def run(self) -> None:
        """Report until cancelled. Never raises for a failed send."""
        if not self.addresses:
            return
        self._disk_baseline = await asyncio.to_thread(disk_used_bytes, self.disk_path)
        async with outbound.session() as session:
            self._session = session
            try:
                await run_all(self._status_loop(), self._finished_loop())
            finally:
                self._session = None

    async def final_report(self) -> None:
        """One last status and finished-requests report, e.g. while the worker drains."""
        if not self.addresses or self._session is None:
            return
        await self.send_status()
        while self.ledger.finished_waiting and await self.send_finished():
            pass

    async def _status_loop(self) -> None:
        seen = 0  # the status as it was made: any change since is reported at once
        while True:
            changed = await self.status.wait_changed(self.busy_interval, seen)
            seen = self.status.version  # a change while the report is sent wakes the next wait
            if changed or self._due():
                await self.send_status()

    async def _finished_loop(self) -> None:
        """Report finished requests; after a failure wait longer, up to `idle_interval`."""
        delay = self.busy_interval
        while True:
            await asyncio.sleep(delay)
            delay = self.busy_interval
            while self.ledger.finished_waiting:
                if not await self.send_finished():
                    self.failed_deletes += 1
                    delay = min(self._retry_delay * 2, self.idle_interval)
                    break
            self._retry_delay = delay

    def _due(self) -> bool:
        if time.monotonic() - self._last_sent_at >= self.idle_interval:
            return True
        return self._signature() != self._last_signature or _has_news(self.ledger.interval())

    def _signature(self) -> tuple[Any, ...]:
        status = self.status
        return (
            status.state,
            status.error_msg,
            status.max_perf,
            self.ledger.current_load,
            self.ledger.in_progress,
        )

    def build_status(self, interval: Interval, disk_bytes: int) -> WorkerStatusReport:
        baseline = self._disk_baseline if self._disk_baseline is not None else disk_bytes
        ledger, status = self.ledger, self.status
        return WorkerStatusReport(
            id=self.worker_id,
            mtoken=self._mtoken,
            version=__version__,
            loadtime=status.loadtime if status.ready or status.loadtime else 0.0,
            cur_load=ledger.current_load,
            new_load=interval.new_load,
            rej_load=interval.rejected_load,
            cur_perf=interval.served_load,
            max_perf=status.max_perf if status.ready else 0.0,
            error_msg=status.error_msg,
            num_requests_working=ledger.in_progress,
            num_requests_recieved=interval.received,
            additional_disk_usage=max(disk_bytes - baseline, 0) / GB,
            working_request_idxs=ledger.working_request_idxs(),
            url=self.url(),
        )

    async def send_status(self) -> bool:
        """Send one status report, after the one in flight; True once acknowledged."""
        async with self._status_lock:
            return await self._send_status()

    async def _send_status(self) -> bool:
        signature = self._signature()
        disk_bytes = await asyncio.to_thread(disk_used_bytes, self.disk_path)
        # Consumed now, before the report leaves: whatever becomes of it, never sent twice.
        interval = Interval() if self._in_doubt else self.ledger.interval()
        self.ledger.commit_interval(interval)
        report = self.build_status(interval, disk_bytes).to_wire()
        delivery = await self._post(STATUS_PATH, report, failover=False)
        if delivery is not Delivery.ACKNOWLEDGED:
            self.failed_reports += 1
            if delivery is Delivery.NOT_DELIVERED:
                self.ledger.restore_interval(interval)
            else:
                self._in_doubt = True
            return False
        self._in_doubt = False
        self._disk_baseline = disk_bytes
        self._last_signature = signature
        self._last_sent_at = time.monotonic()
        self.sent_reports += 1
        self.last_report = {k: v for k, v in report.items() if k != "mtoken"}
        return True

    async def send_finished(self, limit: int = 1000) -> bool:
        """Report finished requests, after the report in flight; True once acknowledged."""
        async with self._finished_lock:
            records = self.ledger.take_finished(limit)
            if not records:
                return False
            items = [record.finished_item() for record in records]
            body = DeleteRequests(self.worker_id, self._mtoken, requests=items).to_wire()
            if await self._post(DELETE_REQUESTS_PATH, body) is Delivery.ACKNOWLEDGED:
                return True
            self.ledger.return_finished(records)
            return False

    async def _post(self, path: str, body: dict[str, Any], *, failover: bool = True) -> Delivery:
        """Try each address in turn, a few attempts each, until one acknowledges.

        Without `failover` (a report that must not arrive twice) it moves on only while the
        report certainly did not arrive, and stops at the first answer of unknown effect.
        A redirect is not followed (pyworker.lifecycle.outbound): the next address is tried.
        """
        session = self._session
        if session is None:
            return Delivery.NOT_DELIVERED
        replies = outbound.attempts(
            session,
            self.addresses,
            path,
            timeout=self.attempt_timeout,
            per_address=self.attempts_per_address,
            data=orjson.dumps(body),
            headers={"Content-Type": "application/json"},
        )
        async with contextlib.aclosing(replies):
            async for reply in replies:
                delivery = _delivery(reply)
                if delivery is Delivery.ACKNOWLEDGED:
                    return delivery
                logger.debug("%s: %s", reply.url, reply.problem)
                if delivery is Delivery.UNKNOWN and not failover:
                    logger.warning(
                        "report %s: %s; its deltas are not sent again", path, reply.problem
                    )
                    return delivery
        logger.warning("report %s reached none of %d address(es)", path, len(self.addresses))
        return Delivery.NOT_DELIVERED


def _delivery(reply: outbound.Reply) -> Delivery:
    """A redirect is a report not delivered: whoever it points to never gets it."""
    if reply.ok:
        return Delivery.ACKNOWLEDGED
    if not reply.connected or reply.redirected or reply.status in NOT_HANDLED:
        return Delivery.NOT_DELIVERED
    return Delivery.UNKNOWN


def _has_news(interval: Interval) -> bool:
    return bool(
        interval.received or interval.new_load or interval.served_load or interval.rejected_load
    )
