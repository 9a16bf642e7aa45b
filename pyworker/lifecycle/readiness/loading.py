"""Knowing the model loaded, or broke: its log, its health route, its in-process lifecycle.

Each load signal sets `loaded`, which starts a readiness pass; what says the model broke (a
fatal log line, the load deadline passing, the in-process lifecycle failing to enter) is
reported as its event.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from pyworker.config import Pattern, PatternConfig, WorkerConfig
from pyworker.config.load_deadline import LoadDeadline, never_entered_message, never_loaded_message
from pyworker.lifecycle.in_process import InProcessModel, LoadFailed
from pyworker.lifecycle.logfollow import LineKind, LogFollower, LogPattern
from pyworker.lifecycle.readiness.health import Fail, wait_until_healthy
from pyworker.lifecycle.state import LifecycleEvent
from pyworker.upstream.model import ModelClient

logger = logging.getLogger(__package__)

MAX_ERROR_LINE = 500


def log_patterns(config: WorkerConfig) -> list[LogPattern]:
    server = config.model_server
    patterns: list[LogPattern] = []
    for kind, items in (
        (LineKind.LOADED, server.load_patterns),
        (LineKind.ERROR, server.error_patterns),
        (LineKind.INFO, server.info_patterns),
    ):
        patterns.extend(_pattern(kind, item) for item in items)
    return patterns


def _pattern(kind: LineKind, item: Pattern) -> LogPattern:
    if isinstance(item, PatternConfig):
        return LogPattern(kind, item.text, regex=item.regex, fatal=item.fatal)
    return LogPattern(kind, item)


class LoadWatch:
    """Watches for the model's load signals and its failures, for one readiness at a time."""

    def __init__(
        self,
        config: WorkerConfig,
        model: ModelClient,
        in_process: InProcessModel | None,
        loaded: asyncio.Event,
        fail: Fail,
        loaded_here_before: Callable[[], bool],
    ) -> None:
        self.config = config
        self.model = model
        self.in_process = in_process
        self.loaded = loaded
        """Set at each load signal: the coordinator starts a readiness pass."""
        self.fail = fail
        self.loaded_here_before = loaded_here_before
        self.seen = asyncio.Event()
        """Set when the first pass starts: what the load deadline waits for."""
        self.follower: LogFollower | None = None
        self.error_lines = 0

    def watchers(
        self, poll_interval: float, deadline: LoadDeadline | None
    ) -> list[Coroutine[Any, Any, None]]:
        """The watches one run of readiness needs, per the config; the log read from its start."""
        server = self.config.model_server
        watchers = []
        if server.log_file:
            patterns = log_patterns(self.config)
            self.follower = LogFollower(server.log_file, patterns, poll_interval=poll_interval)
            watchers.append(self._watch_log(self.follower))
        if self.in_process is not None:
            watchers.append(self._load_in_process(self.in_process))
        elif server.readiness_source == "health":
            watchers.append(self._wait_for_health(poll_interval))
        if deadline is not None:
            watchers.append(self.enforce_deadline(deadline))
        return watchers

    async def _watch_log(self, follower: LogFollower) -> None:
        async for event in follower.events():
            if event.kind is LineKind.LOADED:
                logger.info("model server load line seen")
                if self.config.model_server.readiness_source == "log":
                    self.loaded.set()
            elif event.kind is LineKind.ERROR:
                self.error_lines += 1
                if event.fatal:
                    message = f"model server error: {event.line[:MAX_ERROR_LINE]}"
                    self.fail(LifecycleEvent.FATAL_LINE_SEEN, message)
            elif event.kind is LineKind.INFO:
                # What info patterns are for: progress (downloads, compilation) in our log.
                logger.info("model server: %s", event.line[:MAX_ERROR_LINE])

    async def _wait_for_health(self, poll_interval: float) -> None:
        path = self.config.model_server.health_path
        if path:
            await wait_until_healthy(self.model, path, poll_interval)
        self.loaded.set()

    async def _load_in_process(self, model: InProcessModel) -> None:
        """Loaded means the lifecycle is entered; its failure is the worker's error."""
        try:
            await model.load()
        except LoadFailed as error:
            # Said even over the load deadline's error: this one is the cause.
            self.fail(LifecycleEvent.LOAD_FAILED, str(error)[:MAX_ERROR_LINE])
            return
        self.loaded.set()

    async def enforce_deadline(self, deadline: LoadDeadline) -> None:
        """ERRORED, reported at once, when the model gives no load signal in time."""
        before = await asyncio.to_thread(self.loaded_here_before)
        seconds = deadline.seconds(before)
        if seconds <= 0:
            return
        logger.info(
            "waiting up to %g s for the model to load (%s)",
            seconds,
            "it loaded here before" if before else "first start on this machine",
        )
        seen = asyncio.ensure_future(self.seen.wait())
        try:
            done, _ = await asyncio.wait({seen}, timeout=seconds)
        finally:
            seen.cancel()
        if done:
            return
        if self.in_process is not None:
            message = never_entered_message(self.in_process.name, seconds, before)
        else:
            message = never_loaded_message(seconds, before)
        self.fail(LifecycleEvent.LOAD_DEADLINE_PASSED, message)
