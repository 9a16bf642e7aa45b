"""Keeping the worker's long-lived tasks alive: a crash is logged, reported, and restarted.

A background task that dies silently takes a worker out of the fleet without a word: the
readiness task stuck in "benchmarking", a reporter that never reports again. Every long-lived
task runs under a `Supervisor`: an unexpected exception is logged with its traceback, handed
to the task's `on_failure` (which may turn it into the `error_msg` the autoscaler receives),
and the task is started again after a backoff that doubles up to a bound. A task that returns
normally is done. One-shot tasks (a session's close call) run under `logged`, which never lets
an exception escape unseen. The GPU sampler, a thread, uses `Backoff` the same way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

FailureHandler = Callable[[str, BaseException], None]
TaskFactory = Callable[[], Awaitable[None]]
CLOSE_PATIENCE = 10.0
"""How long closing waits for cancelled tasks to end before it goes on without them."""
RECANCEL_INTERVAL = 0.5


@dataclass(slots=True)
class Backoff:
    """Delays between restarts: `first`, doubling up to `maximum`; reset after a stable run."""

    first: float = 0.5
    maximum: float = 30.0
    stable_after: float = 60.0
    """A run that lasted this long resets the delay to `first`."""
    _next: float = field(default=0.0, init=False)

    def delay(self, ran_for: float) -> float:
        """The wait before the next start, given how long the failed run lasted."""
        if ran_for >= self.stable_after or self._next == 0.0:
            self._next = self.first
        delay = self._next
        self._next = min(self._next * 2, self.maximum)
        return delay


def describe(error: BaseException) -> str:
    """A one-line account of an exception, for an `error_msg` (bounded, never a traceback)."""
    text = str(error).splitlines()[0] if str(error) else ""
    line = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return line[:300]


class Supervisor:
    """Runs named tasks for the worker's lifetime, restarting them when they crash."""

    def __init__(self, backoff: Callable[[], Backoff] = Backoff) -> None:
        self._backoff = backoff
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self.failures: dict[str, int] = {}
        """Crashes per task name since start (`/status` and tests read it)."""

    def __len__(self) -> int:
        return len(self._tasks)

    def supervise(
        self,
        name: str,
        start: TaskFactory | Coroutine[Any, Any, None],
        *,
        on_failure: FailureHandler | None = None,
        restart: bool = True,
    ) -> asyncio.Task[None]:
        """Run `start()` as task `name`; a coroutine object (not restartable) runs once."""
        if asyncio.iscoroutine(start):
            coroutine = start
            task = asyncio.ensure_future(self._once(name, coroutine, on_failure))
        else:
            assert callable(start)
            task = asyncio.ensure_future(self._keep(name, start, on_failure, restart))
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def aclose(self, patience: float = CLOSE_PATIENCE) -> None:
        """Cancel every task and wait for them to end, `patience` seconds at the most.

        A task whose code turned its cancellation into an error (`asyncio.wait_for`'s race on
        Python 3.10/3.11, a library that wraps it) is not restarted and is cancelled again; one
        that still runs after `patience` is named in the log and left, so that a worker always
        gets to exit.
        """
        self._closing = True
        deadline = time.monotonic() + patience
        while self._tasks and (left := deadline - time.monotonic()) > 0:
            pending = list(self._tasks)
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=min(left, RECANCEL_INTERVAL))
        if self._tasks:
            names = sorted(task.get_name() for task in self._tasks)
            logger.warning(
                "tasks %s did not stop within %.0f s of being cancelled", names, patience
            )

    async def _once(
        self,
        name: str,
        coroutine: Coroutine[Any, Any, None],
        on_failure: FailureHandler | None,
    ) -> None:
        try:
            await coroutine
        except Exception as error:
            self._failed(name, error, on_failure)

    async def _keep(
        self,
        name: str,
        start: TaskFactory,
        on_failure: FailureHandler | None,
        restart: bool,
    ) -> None:
        backoff = self._backoff()
        while True:
            began = time.monotonic()
            try:
                await start()
                return
            except Exception as error:
                self._failed(name, error, on_failure)
            if not restart or self._closing:
                return
            delay = backoff.delay(time.monotonic() - began)
            logger.warning("restarting task %s in %.1f s", name, delay)
            await asyncio.sleep(delay)

    def _failed(self, name: str, error: BaseException, on_failure: FailureHandler | None) -> None:
        self.failures[name] = self.failures.get(name, 0) + 1
        logger.error("task %s failed", name, exc_info=error)
        if on_failure is None:
            return
        try:
            on_failure(name, error)
        except Exception:
            logger.exception("the failure handler of task %s failed", name)


async def logged(name: str, coroutine: Awaitable[None]) -> None:
    """Await a one-shot coroutine; an exception is logged with its traceback, never raised."""
    try:
        await coroutine
    except Exception:
        logger.exception("task %s failed", name)


async def run_all(*coroutines: Coroutine[Any, Any, None]) -> None:
    """Run coroutines together until all end; the first exception cancels the others.

    Unlike `asyncio.gather`, no sibling outlives a failure to run on unsupervised.
    """
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            error = task.exception()
            if error is not None:
                raise error
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
