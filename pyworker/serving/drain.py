"""Stopping gracefully: what a worker does between SIGTERM and its exit.

1. It enters DRAINING: the listener stays open and new requests get 503 with Retry-After,
   so clients (and the autoscaler, through the status report) go elsewhere.
2. Requests in flight, streams included, finish, up to the grace period; then they are cut
   (accounted Cancelled).
3. Open sessions are closed: their close routes are called, their request_idx reported done.
   A model loaded in the worker's own process is unloaded (its lifecycle exited) then.
4. The drain hooks run, each bounded by HOOK_TIMEOUT: this is where the reporter sends its
   last status report (the composition root, pyworker.serving.compose, registers them).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from pyworker.lifecycle.state import LifecycleEvent, WorkerStatus
from pyworker.serving.inflight import InFlight
from pyworker.serving.sessions import SessionStore

logger = logging.getLogger(__name__)

DrainHook = Callable[[], Awaitable[None]]
HOOK_TIMEOUT = 20.0
"""Room for the reporter's final report to wait for the one in flight, then be sent."""
CUT_TIMEOUT = 5.0
"""How long cut requests get to unwind and be accounted."""


@dataclass(frozen=True, slots=True)
class Drainable:
    """What a drain stops, in order: new requests, those in flight, sessions, then the hooks."""

    status: WorkerStatus
    in_flight: InFlight
    sessions: SessionStore
    hooks: list[DrainHook]
    """Appended to until the drain starts (`hooks.append(coroutine_function)`)."""
    unload: DrainHook | None = None
    """Frees a model loaded in the worker's own process, once nothing uses it any more."""


async def drain(parts: Drainable, grace: float) -> None:
    parts.status.handle(LifecycleEvent.DRAIN_REQUESTED)
    in_flight = parts.in_flight
    logger.info("draining: %d request(s) in flight, grace %.1f s", len(in_flight), grace)
    if not await in_flight.wait_idle(grace):
        logger.warning("grace period over: cutting %d request(s)", in_flight.cancel_all())
        await in_flight.wait_idle(CUT_TIMEOUT)
    await parts.sessions.close_all()
    if parts.unload is not None:
        await parts.unload()
    await run_hooks(parts.hooks)
    logger.info("drained")


async def run_hooks(hooks: Sequence[DrainHook], timeout: float = HOOK_TIMEOUT) -> None:
    """Run every hook concurrently; one that fails or hangs is logged, never fatal."""

    async def run(hook: DrainHook) -> None:
        try:
            await asyncio.wait_for(hook(), timeout)
        except asyncio.TimeoutError:
            logger.warning("drain hook %s took over %.0f s: abandoned", _name(hook), timeout)
        except Exception:
            logger.exception("drain hook %s failed", _name(hook))

    await asyncio.gather(*(run(hook) for hook in hooks))


def _name(hook: DrainHook) -> str:
    return getattr(hook, "__qualname__", repr(hook))
