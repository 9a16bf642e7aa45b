"""What each signal does to a running worker (docs/supervision.md has the table).

- SIGTERM, SIGINT: drain (pyworker.serving.drain), then exit 0. A second one of these during
  the drain means now: exit at once with 128 + its number (143, 130), as before.
- SIGHUP: drain, as SIGTERM does. It is sent when the terminal or supervisor session the worker
  was started from goes away; its default action would end the worker at once, cutting streams
  and losing their accounting. It never cuts a drain short: a hang-up often comes with, or
  after, a SIGTERM from the same supervisor, and neither of them is someone insisting.
- SIGQUIT, SIGUSR1, SIGUSR2: logged and otherwise ignored. The worker has nothing to reload or
  dump, and their default actions (end the process, SIGQUIT with a core) would cut every
  request in flight without a report.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from dataclasses import dataclass

logger = logging.getLogger(__name__)

URGENT = (signal.SIGTERM, signal.SIGINT)
"""Drain; the second of these exits at once."""
DRAINING = (*URGENT, signal.SIGHUP)
IGNORED = (signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


@dataclass(slots=True)
class StopSignals:
    """Turns signals into `stop` being set (the drain starts), or an immediate exit."""

    stop: asyncio.Event
    urgent: int = 0
    """SIGTERM and SIGINT received so far."""

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        for signum in DRAINING:
            loop.add_signal_handler(signum, self.on_signal, signum)
        for signum in IGNORED:
            loop.add_signal_handler(signum, self.on_ignored, signum)

    def on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if signum in URGENT:
            self.urgent += 1
            if self.urgent > 1:
                exit_now(signum)
        if not self.stop.is_set():
            again = " (SIGTERM or SIGINT again exits at once)"
            logger.info("%s: draining%s", name, again if self.urgent else "")
            self.stop.set()
        else:
            logger.info("%s: already draining", name)

    @staticmethod
    def on_ignored(signum: int) -> None:
        logger.info(
            "%s ignored: SIGTERM, SIGINT or SIGHUP drain the worker", signal.Signals(signum).name
        )


def exit_now(signum: int) -> None:
    """Exit without cleaning up: what a second SIGTERM or SIGINT asks for."""
    print(f"pyworker: {signal.Signals(signum).name} again: exiting now", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signum)
