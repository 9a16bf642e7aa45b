"""`POST /pyworker/update`: the autoscaler asks the worker to reinstall itself on next boot.

The answer is to write the update marker file; the start script sees it and reinstalls. The
reference leaves this route open when MASTER_TOKEN is unset (an empty bearer matches an empty
token) and compares tokens with `!=`; here it is refused outright without a token, and the
comparison takes the same time whatever the guess.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from pyworker.config.environment import Environment
from pyworker.serving import refusals
from pyworker.serving.access import MasterToken, bearer_token
from pyworker.serving.responses import json_response

__all__ = ["UPDATE_PATH", "bearer_token", "update_handler"]

logger = logging.getLogger(__name__)

UPDATE_PATH = "/pyworker/update"


def update_handler(environment: Environment) -> Callable[[web.Request], Awaitable[web.Response]]:
    token = MasterToken(environment)
    marker = Path(environment.update_marker)

    async def update(request: web.Request) -> web.Response:
        if token.expected is None:
            raise refusals.updates_disabled()
        if not token.matches(request):
            raise refusals.invalid_token()
        try:
            await asyncio.to_thread(_write_marker, marker)
        except OSError as error:
            logger.error("cannot write the update marker %s: %s", marker, error.strerror)
            raise refusals.update_marker_unwritable() from None
        logger.info("update requested: wrote %s", marker)
        return json_response(200, {"ok": True})

    return update


def _write_marker(marker: Path) -> None:
    marker.write_text(f"{time.time():.0f}\n", encoding="utf-8")
