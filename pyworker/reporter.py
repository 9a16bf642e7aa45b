"""Pushing the worker's state to the autoscaler: `/worker_status/` and `/delete_requests/`.

A status report goes out at once on a state change, about every second while something
changed, and at least every `idle_interval` seconds otherwise. Interval counters are only
cleared by a report that was received, so an autoscaler that is away loses nothing that fits
in the ledger's bounds.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson

from pyworker import __version__
from pyworker.accounting import Interval, Ledger
from pyworker.environment import Environment
from pyworker.state import WorkerStatus

logger = logging.getLogger(__name__)

GB = 1e9


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
        attempt_timeout: float = 3.0,
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
        self.busy_interval = busy_interval
        self.idle_interval = idle_interval
        self.attempt_timeout = attempt_timeout
        self.attempts_per_address = attempts_per_address
        self.disk_path = disk_path
        self.sent_reports = 0
        self.failed_reports = 0
        self.last_report: dict[str, Any] | None = None
        self._disk_baseline: int | None = None
        self._last_signature: tuple[Any, ...] | None = None
        self._last_sent_at = 0.0
        self._session: aiohttp.ClientSession | None = None

    async def run(self) -> None:
        """Report until cancelled. Never raises for a failed send."""
        if not self.addresses:
            return
        self._disk_baseline = await asyncio.to_thread(disk_used_bytes, self.disk_path)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
            self._session = session
            try:
                await asyncio.gather(self._status_loop(), self._finished_loop())
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
        while True:
            changed = await self.status.wait_changed(self.busy_interval)
            if changed or self._due():
                await self.send_status()

    async def _finished_loop(self) -> None:
        while True:
            await asyncio.sleep(self.busy_interval)
            while self.ledger.finished_waiting and await self.send_finished():
                pass

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

    def build_status(self, interval: Interval, disk_bytes: int) -> dict[str, Any]:
        baseline = self._disk_baseline if self._disk_baseline is not None else disk_bytes
        ledger, status = self.ledger, self.status
        return {
            "id": self.worker_id,
            "mtoken": self._mtoken,
            "version": __version__,
            "loadtime": status.loadtime if status.ready or status.loadtime else 0.0,
            "cur_load": ledger.current_load,
            "new_load": interval.new_load,
            "rej_load": interval.rejected_load,
            "cur_perf": interval.served_load,
            "max_perf": status.max_perf if status.ready else 0.0,
            "error_msg": status.error_msg,
            "num_requests_working": ledger.in_progress,
            "num_requests_recieved": interval.received,
            "additional_disk_usage": max(disk_bytes - baseline, 0) / GB,
            "working_request_idxs": ledger.working_request_idxs(),
            "cur_capacity": 0,
            "max_capacity": 0,
            "url": self.url(),
        }

    async def send_status(self) -> bool:
        signature = self._signature()
        interval = self.ledger.interval()
        disk_bytes = await asyncio.to_thread(disk_used_bytes, self.disk_path)
        report = self.build_status(interval, disk_bytes)
        if not await self._post("/worker_status/", report):
            self.failed_reports += 1
            return False
        self.ledger.commit_interval(interval)
        self._disk_baseline = disk_bytes
        self._last_signature = signature
        self._last_sent_at = time.monotonic()
        self.sent_reports += 1
        self.last_report = {k: v for k, v in report.items() if k != "mtoken"}
        return True

    async def send_finished(self, limit: int = 1000) -> bool:
        records = self.ledger.take_finished(limit)
        if not records:
            return False
        body = {
            "worker_id": self.worker_id,
            "mtoken": self._mtoken,
            "requests": [record.to_wire() for record in records],
        }
        if await self._post("/delete_requests/", body):
            return True
        self.ledger.return_finished(records)
        return False

    async def _post(self, path: str, body: dict[str, Any]) -> bool:
        """Try each address in turn, a few attempts each; True once one accepted it."""
        session = self._session
        if session is None:
            return False
        data = orjson.dumps(body)
        headers = {"Content-Type": "application/json"}
        timeout = aiohttp.ClientTimeout(total=self.attempt_timeout)
        for address in self.addresses:
            for attempt in range(1, self.attempts_per_address + 1):
                try:
                    async with session.post(
                        address + path, data=data, headers=headers, timeout=timeout
                    ) as response:
                        await response.read()
                        if response.status < 300:
                            return True
                        problem = f"HTTP {response.status}"
                except (aiohttp.ClientError, asyncio.TimeoutError) as error:
                    problem = error.__class__.__name__
                logger.debug("%s%s attempt %d: %s", address, path, attempt, problem)
        logger.warning("report %s reached none of %d address(es)", path, len(self.addresses))
        return False


def _has_news(interval: Interval) -> bool:
    return bool(
        interval.received or interval.new_load or interval.served_load or interval.rejected_load
    )
