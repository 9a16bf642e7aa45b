"""Following the dev worker until the local autoscaler routes to it, one spinner line a phase.

The worker's `/ready` says loading, benchmarking or ready; "ready" counts once the autoscaler's
fleet has it ready too, since that is when a client's request can reach it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import aiohttp

from pyworker.devtools.commands.children import Child, Children
from pyworker.devtools.commands.dev.output import shown
from pyworker.devtools.commands.dev.plan import DevError
from pyworker.devtools.commands.progress import Spinner
from pyworker.devtools.local.autoscaler import LocalAutoscaler
from pyworker.devtools.local.fleet import WorkerPhase

WORKER_ID = 1
"""The dev worker's CONTAINER_ID: the one record in the local autoscaler's fleet."""
POLL_INTERVAL = 0.2
PROBE_TIMEOUT = 2.0


class Phase(IntEnum):
    """How far the worker has come, as `pyworker dev` shows it."""

    LOADING = 0
    BENCHMARKING = 1
    REGISTERING = 2
    READY = 3


PHASE_LABELS = {
    Phase.LOADING: "loading the model",
    Phase.BENCHMARKING: "benchmarking the model",
    Phase.REGISTERING: "waiting for the autoscaler to see the worker ready",
}
WORKER_STATES = {
    "starting": Phase.LOADING,
    "loading": Phase.LOADING,
    "benchmarking": Phase.BENCHMARKING,
    "ready": Phase.REGISTERING,
}


@dataclass(slots=True)
class ReadyWatch:
    """What following the worker needs: where to show it, what to ask, what may fail."""

    spinner: Spinner
    children: Children
    autoscaler: LocalAutoscaler
    worker_url: str
    master_token: str
    """The worker shows its benchmark only to its MASTER_TOKEN's holder."""

    async def wait(self, worker: Child, timeout: float) -> None:
        """Return once the autoscaler routes to the worker; DevError if it fails or is late."""
        deadline = time.monotonic() + timeout
        phase = Phase.LOADING
        await asyncio.to_thread(self.spinner.start, PHASE_LABELS[phase])
        operator = {"Authorization": f"Bearer {self.master_token}"}
        async with aiohttp.ClientSession(headers=operator) as client:
            while True:
                seen = await self._phase_seen(client, worker, phase)
                while phase < seen:
                    await self._finish_phase(phase, client)
                    phase = Phase(phase + 1)
                    if phase in PHASE_LABELS:
                        await asyncio.to_thread(self.spinner.start, PHASE_LABELS[phase])
                if phase is Phase.READY:
                    return
                if time.monotonic() > deadline:
                    raise DevError(
                        f"the worker was not ready after {timeout:g} s "
                        f"(still {PHASE_LABELS[phase]}; see {shown(worker.log_path)})"
                    )
                await asyncio.sleep(POLL_INTERVAL)

    async def _phase_seen(
        self, client: aiohttp.ClientSession, worker: Child, phase: Phase
    ) -> Phase:
        """The phase the worker and the autoscaler show now (`phase` when the worker is mute)."""
        exited = self.children.first_exited()
        if exited is not None:
            raise exited.exit_error()
        state, error = await self._worker_state(client)
        if state == "errored":
            raise DevError(f"the worker is errored: {error} (see {shown(worker.log_path)})")
        seen = WORKER_STATES.get(state, phase)
        if seen >= Phase.REGISTERING and self._autoscaler_sees_ready():
            return Phase.READY
        return seen

    async def _worker_state(self, client: aiohttp.ClientSession) -> tuple[str, str]:
        try:
            document = await _get_json(client, self.worker_url + "/ready")
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return "", ""
        if not isinstance(document, dict):
            return "", ""
        return str(document.get("state") or ""), str(document.get("error") or "")

    def _autoscaler_sees_ready(self) -> bool:
        record = self.autoscaler.fleet.workers.get(WORKER_ID)
        return record is not None and self.autoscaler.fleet.phase(record) is WorkerPhase.READY

    async def _finish_phase(self, phase: Phase, client: aiohttp.ClientSession) -> None:
        elapsed = self.spinner.elapsed()
        if phase is Phase.LOADING:
            text = f"model loaded (waited {elapsed:.1f} s)"
        elif phase is Phase.BENCHMARKING:
            text = await self._benchmark_summary(client, elapsed)
        else:
            report = self.autoscaler.fleet.workers[WORKER_ID].report
            text = (
                f"worker ready: the autoscaler routes to it (max_perf "
                f"{report.max_perf:.1f} workload/s, loadtime {report.loadtime:.1f} s)"
            )
        await asyncio.to_thread(self.spinner.succeed, text)

    async def _benchmark_summary(self, client: aiohttp.ClientSession, elapsed: float) -> str:
        try:
            document = await _get_json(client, self.worker_url + "/status")
            benchmark = document.get("benchmark") or {}
            perf = float(benchmark["perf"])
        except (
            aiohttp.ClientError,
            asyncio.TimeoutError,
            ValueError,
            KeyError,
            TypeError,
            AttributeError,
        ):
            return f"benchmark done in {elapsed:.1f} s"
        source = "from the cache" if benchmark.get("cached") else f"in {elapsed:.1f} s"
        return f"benchmark done {source}: {perf:.1f} workload/s"


async def _get_json(client: aiohttp.ClientSession, url: str) -> Any:
    """The JSON document at `url`, whatever its content type (a probe of the worker)."""
    timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT)
    async with client.get(url, timeout=timeout) as response:
        return await response.json(content_type=None)
