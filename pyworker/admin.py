"""`POST /pyworker/update`: the autoscaler asks the worker to reinstall itself on next boot.

The answer is to write the update marker file; the start script sees it and reinstalls. The
reference leaves this route open when MASTER_TOKEN is unset (an empty bearer matches an empty
token) and compares tokens with `!=`; here it is refused outright without a token, and the
comparison takes the same time whatever the guess.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from pyworker.environment import Environment
from pyworker.responses import error_response, json_response

logger = logging.getLogger(__name__)

UPDATE_PATH = "/pyworker/update"


def update_handler(environment: Environment) -> Callable[[web.Request], Awaitable[web.Response]]:
    token = environment.master_token
    expected = token.get_secret_value().encode() if token is not None else None
    marker = Path(environment.update_marker)

    async def update(request: web.Request) -> web.Response:
        if expected is None:
            return error_response(403, "updates are disabled: MASTER_TOKEN is not set")
        # Header bytes that are not UTF-8 reach us as surrogates: any str encodes this way.
        given = bearer_token(request.headers.get("Authorization", "")).encode(
            "utf-8", "surrogatepass"
        )
        if not hmac.compare_digest(given, expected):
            return json_response(401, {"error": "invalid token"}, {"WWW-Authenticate": "Bearer"})
        try:
            await asyncio.to_thread(_write_marker, marker)
        except OSError as error:
            logger.error("cannot write the update marker %s: %s", marker, error.strerror)
            return error_response(500, "cannot write the update marker")
        logger.info("update requested: wrote %s", marker)
        return json_response(200, {"ok": True})

    return update


def bearer_token(header: str) -> str:
    """The token of `Bearer <token>`; a bare token too, as the reference accepts it."""
    scheme, _, credentials = header.strip().partition(" ")
    if scheme.lower() == "bearer":
        return credentials.strip()
    return header.strip()


def _write_marker(marker: Path) -> None:
    marker.write_text(f"{time.time():.0f}\n", encoding="utf-8")
