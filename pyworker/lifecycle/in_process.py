"""The model loaded in the worker's own process: its context manager, entered and exited once.

The context manager is held by one task of its own, `async with manager: wait for the end`,
so it is entered and exited in the same task, as `async with` does, whoever asks for the
load (readiness, restarted by its supervisor) and whoever ends it (the drain, after the
requests in flight finished, or the shutdown). A manager whose `__aenter__` raised, or was
still loading at shutdown (cancelled then), is not exited: there is nothing to free, as with
`async with`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pyworker.config import WorkerConfig
from pyworker.config.in_process import (
    ModelLifecycle,
    lifecycle_name,
    make_manager,
    pair_manager,
)
from pyworker.upstream.model import ModelClient

logger = logging.getLogger(__name__)

EXIT_TIMEOUT = 60.0
"""How long freeing the model may take at the end before it is abandoned (cancelled)."""


class LoadFailed(Exception):
    """The lifecycle's `__aenter__` raised; the message names the lifecycle and the error."""


class InProcessModel:
    """Enters the template's lifecycle once (`load`) and exits it once (`unload`)."""

    def __init__(
        self, lifecycle: ModelLifecycle, name: str, model: ModelClient | None = None
    ) -> None:
        self.lifecycle = lifecycle
        self.name = name
        self.model = model
        """Whose route functions may still run in threads when the lifecycle is exited."""
        self._task: asyncio.Task[None] | None = None
        self._entered = asyncio.Event()
        self._release = asyncio.Event()

    @classmethod
    def from_config(
        cls, config: WorkerConfig, model: ModelClient | None = None
    ) -> InProcessModel | None:
        if config.lifecycle is not None:
            return cls(config.lifecycle, lifecycle_name(config.lifecycle), model)
        if config.setup is not None:
            manager = pair_manager(config.setup, config.teardown)
            return cls(manager, lifecycle_name(config.setup), model)
        return None

    @property
    def entered(self) -> bool:
        return self._entered.is_set()

    async def load(self) -> None:
        """Wait until the lifecycle is entered (entering it on the first call); `LoadFailed`
        if its `__aenter__` raised. Cancelling a caller leaves the load running."""
        if self._task is None:
            self._task = asyncio.create_task(self._hold(), name=f"lifecycle {self.name}")
        entered = asyncio.ensure_future(self._entered.wait())
        try:
            await asyncio.wait({entered, self._task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            entered.cancel()
        if self._entered.is_set():
            return
        error = self._task.exception() if not self._task.cancelled() else None
        raise LoadFailed(f"model lifecycle {self.name} failed to load: {_describe(error)}")

    async def unload(self, timeout: float = EXIT_TIMEOUT) -> None:
        """Exit the lifecycle if it was entered, or stop its load; any number of calls, one
        exit."""
        task = self._task
        if task is None:
            return
        if not self._entered.is_set():
            task.cancel()  # still loading: nothing to free
        elif self.model is not None and not self._release.is_set():
            await self._functions_done(self.model, timeout)
        self._release.set()
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            logger.error("model lifecycle %s did not exit in %g s: abandoned", self.name, timeout)
            task.cancel()
            await asyncio.wait({task})

    async def _functions_done(self, model: ModelClient, timeout: float) -> None:
        """A sync function whose client timed out may still use the model: let it end."""
        if not await model.functions_idle(timeout):
            logger.warning("exiting %s while a route function still runs", self.name)

    async def _hold(self) -> None:
        manager = make_manager(self.lifecycle)
        logger.info("loading the model: entering %s", self.name)
        entered_once = False
        try:
            async with manager:
                entered_once = True
                self._entered.set()
                logger.info("model lifecycle %s entered", self.name)
                await self._release.wait()
                logger.info("model lifecycle %s: exiting", self.name)
        except asyncio.CancelledError:
            if not entered_once:
                logger.info("model lifecycle %s: load stopped at shutdown", self.name)
            raise
        except Exception:
            if entered_once:
                logger.exception("model lifecycle %s failed to exit", self.name)
                return
            logger.exception("model lifecycle %s failed to load", self.name)
            raise


def _describe(error: Any) -> str:
    if error is None:
        return "its load was stopped"
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
