"""The model server's health path: a load signal, a check before ready, a watch while ready."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable

from pyworker.config import ModelServerConfig
from pyworker.lifecycle.state import LifecycleEvent, WorkerStatus
from pyworker.upstream.errors import UpstreamError
from pyworker.upstream.model import ModelClient

logger = logging.getLogger(__package__)

Fail = Callable[[LifecycleEvent, str], None]
"""How a part reports a failure: the event and its `error_msg` (the coordinator's `fail`)."""


async def probe_health(model: ModelClient, path: str, timeout: float = 5.0) -> bool:
    try:
        return await model.probe(path, timeout) == 200
    except UpstreamError:
        return False


async def wait_until_healthy(
    model: ModelClient, path: str, interval: float, within: float = math.inf
) -> bool:
    """Poll `path` every `interval` s until it answers 200; False once `within` s have passed."""
    deadline = time.monotonic() + within
    while not await probe_health(model, path):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(interval)
    return True


async def watch_while_ready(
    status: WorkerStatus, model: ModelClient, server: ModelServerConfig, fail: Fail
) -> None:
    """While ready, poll health; `health_failed` after `health_failures` failures in a row."""
    path = server.health_path
    assert path is not None
    failures = 0
    while status.ready:
        await asyncio.sleep(server.health_interval)
        if await probe_health(model, path):
            failures = 0
            continue
        failures += 1
        if failures >= server.health_failures and status.ready:
            fail(LifecycleEvent.HEALTH_FAILED, f"model server health check {path} failing")
