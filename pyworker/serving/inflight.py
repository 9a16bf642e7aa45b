"""The requests being served right now, by handler task.

Two things need them: a draining worker waits until none is left (and cuts the rest when the
grace period is over), and a closing session cuts the ones made on it. Cutting means
cancelling the handler task: the request path then accounts the request as Cancelled and
aiohttp drops the client's connection.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pyworker.serving.sessions import Session


class InFlight:
    def __init__(self) -> None:
        self._requests: dict[asyncio.Task[Any], Session | None] = {}
        self._idle = asyncio.Event()
        self._idle.set()

    def __len__(self) -> int:
        return len(self._requests)

    def enter(self, session: Session | None = None) -> None:
        """The current task serves a request (on `session`, if given) until `leave()`."""
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("InFlight.enter() outside a task")
        self._requests[task] = session
        self._idle.clear()
        if session is not None:
            session.attach(task)

    def leave(self) -> None:
        task = asyncio.current_task()
        if task is None or task not in self._requests:
            return
        session = self._requests.pop(task)
        if session is not None:
            session.detach(task)
        if not self._requests:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight, up to `timeout` seconds; True if none is."""
        if self._idle.is_set():
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def cancel_all(self) -> int:
        """Cut every request in flight; returns how many."""
        tasks = [task for task in self._requests if not task.done()]
        for task in tasks:
            task.cancel()
        return len(tasks)
