"""The readiness passes: started at each load signal, retried after a failure, recovered.

A pass posts `pass_started` and `benchmark_started`, takes the benchmark's figure, checks
health and waits for the public key, then posts `pass_done`; a failure is posted as its own
event. What errored the worker decides how it recovers: the public key arriving, health
coming back, a load line, or the retry's backoff.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, field

from pyworker.config import WorkerConfig
from pyworker.config.dataset import BenchmarkError
from pyworker.config.load_deadline import LoadDeadline
from pyworker.lifecycle.benchmark import BenchmarkResult
from pyworker.lifecycle.gpu import GpuInventory, GpuMonitor
from pyworker.lifecycle.in_process import InProcessModel
from pyworker.lifecycle.logfollow import LogFollower
from pyworker.lifecycle.public_key import KeyFetch
from pyworker.lifecycle.readiness.benchmarking import BenchmarkRunner
from pyworker.lifecycle.readiness.health import wait_until_healthy, watch_while_ready
from pyworker.lifecycle.readiness.loading import LoadWatch
from pyworker.lifecycle.state import LifecycleEvent, WorkerState, WorkerStatus
from pyworker.lifecycle.supervision import Backoff, describe, run_all
from pyworker.upstream.model import ModelClient

logger = logging.getLogger(__package__)

RETRY_FIRST = 10.0
RETRY_MAXIMUM = 300.0
"""A failed readiness pass is tried again after 10 s, doubling up to 5 minutes."""


class KeyMissing(Exception):
    """The pass is done but for the public key, which REPORT_ADDR did not give: the worker
    errs, saying so, until the key arrives (its fetch goes on meanwhile)."""


@dataclass(slots=True)
class Retry:
    """A failed pass is tried again after a backoff, unless a load signal comes first.

    The worker stays errored meanwhile, with its error_msg; a model server that recovers by
    itself (a dropped connection, a slow start) brings the worker back without a restart.
    """

    first: float = RETRY_FIRST
    maximum: float = RETRY_MAXIMUM
    _backoff: Backoff | None = field(default=None, init=False)
    _timer: asyncio.TimerHandle | None = field(default=None, init=False)

    def later(self, due: asyncio.Event) -> None:
        if self._backoff is None:
            self._backoff = Backoff(self.first, self.maximum, stable_after=math.inf)
        delay = self._backoff.delay(0.0)
        logger.info("readiness: next try in %.0f s", delay)
        self._timer = asyncio.get_running_loop().call_later(delay, due.set)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def succeeded(self) -> None:
        """Ready: the next failure is retried soon again."""
        self._backoff = None


class Readiness:
    """Composes the load watch, the benchmark and the health watch; run it as one task."""

    def __init__(
        self,
        config: WorkerConfig,
        status: WorkerStatus,
        model: ModelClient,
        gpu: GpuMonitor,
        key: KeyFetch | None,
        *,
        poll_interval: float = 0.2,
        load_deadline: LoadDeadline | None = None,
        in_process: InProcessModel | None = None,
    ) -> None:
        self.config = config
        self.status = status
        self.model = model
        self.gpu = gpu
        self.key = key
        self.poll_interval = poll_interval
        self.load_deadline = load_deadline
        self.benchmarks = BenchmarkRunner(config, model, gpu)
        self._due = asyncio.Event()
        """Set by a load signal, a retry or a recovery: a readiness pass is due."""
        self.loading = LoadWatch(
            config, model, in_process, self._due, self.fail, self.benchmarks.loaded_here_before
        )
        self.retry = Retry()
        self.errored_by: LifecycleEvent | None = None
        """The failure that last errored the worker: it says how the worker recovers."""
        self._pass: asyncio.Task[None] | None = None

    # --- what /status shows ---------------------------------------------------------------
    @property
    def benchmark(self) -> BenchmarkResult | None:
        return self.benchmarks.result

    @property
    def inventory(self) -> GpuInventory:
        return self.benchmarks.inventory

    @property
    def follower(self) -> LogFollower | None:
        return self.loading.follower

    @property
    def error_lines(self) -> int:
        return self.loading.error_lines

    # --- the run --------------------------------------------------------------------------
    async def run(self) -> None:
        self._due.clear()  # a run restarted by its supervisor starts from the log's start
        self.retry.cancel()
        await self.gpu.aopen()
        self.benchmarks.inventory = await self.gpu.ainventory()
        problems = await self.gpu.acheck_health(self.config.gpu_ram)
        if problems:
            self.status.handle(LifecycleEvent.GPUS_FAILED, "; ".join(problems))
            return
        self.status.handle(LifecycleEvent.GPUS_HEALTHY)
        watchers = self.loading.watchers(self.poll_interval, self.load_deadline)
        if self.key is not None:
            watchers.append(self._recover_when_the_key_loads(self.key))
        await run_all(self._drive(), *watchers)

    def fail(self, event: LifecycleEvent, message: str) -> None:
        """Post a failure; unless the table ignores it, it cuts the pass in progress short."""
        logger.error("%s", message)
        if not self.status.handle(event, message):
            return  # the first error since the worker was last ready is usually the root cause
        self.errored_by = event
        if self._pass is not None:
            self._pass.cancel()

    async def _drive(self) -> None:
        while True:
            await self._due.wait()
            self._due.clear()
            self.loading.seen.set()
            self.retry.cancel()
            self._pass = asyncio.create_task(self._readiness_pass())
            try:
                await asyncio.wait({self._pass})
            except asyncio.CancelledError:
                self._pass.cancel()
                raise
            finished, self._pass = self._pass, None
            if finished.cancelled():
                continue  # cut short by an error line; the next load line starts again
            error = finished.exception()
            if error is not None:
                self._failed_pass(error)
                continue
            self.retry.succeeded()
            if self.config.model_server.health_path:
                await self._watch_health()

    def _failed_pass(self, error: BaseException) -> None:
        if isinstance(error, KeyMissing):
            self.fail(LifecycleEvent.KEY_MISSING, str(error))
            if self.key is not None and self.key.loaded.is_set():
                self._due.set()  # it came meanwhile; else its watcher starts the pass
            return
        if isinstance(error, BenchmarkError):
            self.fail(LifecycleEvent.BENCHMARK_FAILED, f"benchmark failed: {error}")
        else:
            # Anything else the engine or a hook can make a pass raise: the worker says so.
            logger.error("readiness pass failed", exc_info=error)
            self.fail(LifecycleEvent.PASS_FAILED, f"readiness failed: {describe(error)}")
        self.retry.later(self._due)

    async def _readiness_pass(self) -> None:
        self.status.handle(LifecycleEvent.PASS_STARTED)
        self.status.handle(LifecycleEvent.BENCHMARK_STARTED)
        if self.config.perf:
            await self.benchmarks.limit_connections()
            perf = self.config.perf
        else:
            perf = (await self.benchmarks.measure()).perf
        self.status.set_perf(perf)
        server = self.config.model_server
        path = server.health_path
        if path and not await wait_until_healthy(
            self.model, path, self.poll_interval, within=server.ready_timeout
        ):
            raise BenchmarkError(f"health check {path} did not answer 200 in time")
        if self.key is not None:
            await _wait_for_key(self.key)
        self.status.handle(LifecycleEvent.PASS_DONE)

    # --- recovering -----------------------------------------------------------------------
    async def _recover_when_the_key_loads(self, key: KeyFetch) -> None:
        await key.loaded.wait()
        errored = self.status.state is WorkerState.ERRORED
        if errored and self.errored_by is LifecycleEvent.KEY_MISSING:
            logger.info("public key loaded: readiness again")
            self._due.set()

    async def _watch_health(self) -> None:
        """While ready, watch health; after it errs the worker, wait for it to recover.

        An error from the log is only cleared by the load line again (the server may well
        still answer its health check while broken), unless health is all there is.
        """
        server = self.config.model_server
        assert server.health_path is not None
        await watch_while_ready(self.status, self.model, server, self.fail)
        if self.status.state is not WorkerState.ERRORED:
            return
        by_health = self.errored_by is LifecycleEvent.HEALTH_FAILED
        if not by_health and server.readiness_source == "log":
            return
        await wait_until_healthy(self.model, server.health_path, server.health_interval)
        logger.info("model server health recovered")
        self._due.set()


async def _wait_for_key(key: KeyFetch) -> None:
    """Until the key loads; `KeyMissing` at once if a whole round over REPORT_ADDR failed."""
    if not key.loaded.is_set() and not key.failed.is_set():
        waits = {asyncio.ensure_future(key.loaded.wait()), asyncio.ensure_future(key.failed.wait())}
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
    if not key.loaded.is_set():
        raise KeyMissing(f"public key unavailable from REPORT_ADDR: {key.problem}")
