"""Getting the worker from STARTING to READY.

Ready means: the public key is loaded (unless unsecured) and the model server's health
endpoint answers 200 when one is configured.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from pyworker.state import WorkerState, WorkerStatus
from pyworker.upstream import ModelClient

logger = logging.getLogger(__name__)


async def wait_for_health(
    model: ModelClient, path: str, interval: float = 0.25, probe_timeout: float = 5.0
) -> None:
    """Poll the model server's health path until it answers 200."""
    url = model.base_url + path
    timeout = aiohttp.ClientTimeout(total=probe_timeout)
    while True:
        try:
            async with model.session.get(url, timeout=timeout) as response:
                if response.status == 200:
                    return
        except (aiohttp.ClientError, TimeoutError):
            pass
        await asyncio.sleep(interval)


async def become_ready(
    status: WorkerStatus,
    model: ModelClient,
    key_loaded: asyncio.Event | None,
    health_path: str | None,
    perf: float | None,
) -> None:
    status.set_state(WorkerState.LOADING)
    if key_loaded is not None:
        await key_loaded.wait()
    if health_path:
        await wait_for_health(model, health_path)
    if perf:
        status.set_perf(perf)
    status.set_state(WorkerState.READY)
