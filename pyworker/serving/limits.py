"""Limits that keep a slow or hostile client from holding the worker's connections.

aiohttp bounds the request line and the headers (`HTTP_LIMITS`, 400 beyond them) and closes a
connection that stays idle, or stuck in its headers, for `keepalive_timeout` seconds. It puts no
bound on how long a body may take, so a client trickling one byte a second would hold its
handler for ever: `body_deadline` gives every body a deadline, past which reading it fails with
`BodyTimeout` and the request is refused (408) on a connection that is then closed. Nothing a
request refused here sends reaches the ledger, so it cannot change reported load or request ids.

aiohttp logs a malformed request at ERROR with a traceback that quotes the offending bytes,
which may be a header holding someone's token: `quiet_malformed_requests`, called where the
application is made (pyworker.serving.compose), has the server's logger (`HTTP_LOGGER`) turn that
into one INFO line that names the problem only.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader
from aiohttp.typedefs import Handler, Middleware

from pyworker.serving import refusals

logger = logging.getLogger(__name__)


class _MalformedRequests(logging.Filter):
    """Rewrites aiohttp's report of a request it could not parse: INFO, no quoted bytes."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.msg = "malformed request from %s: %s (%d)"
            record.args = (remote, type(error).__name__, error.code)
            record.exc_info = None
            record.exc_text = None
            record.levelno = logging.INFO
            record.levelname = logging.getLevelName(logging.INFO)
        return True


HTTP_LOGGER = logging.getLogger("pyworker.http")
"""The logger of the worker's HTTP server (aiohttp's `logger` handler option)."""


def quiet_malformed_requests() -> None:
    """Have `HTTP_LOGGER` report a malformed request in one INFO line; once, however often."""
    if not any(isinstance(known, _MalformedRequests) for known in HTTP_LOGGER.filters):
        HTTP_LOGGER.addFilter(_MalformedRequests())


HTTP_LIMITS: dict[str, Any] = {
    "logger": HTTP_LOGGER,
    "max_line_size": 8190,  # the request line, and one header line
    "max_field_size": 8190,  # one header's value
    "max_headers": 64,
    # After an answer sent before its body was read, how long the rest may take to arrive.
    "lingering_time": 2.0,
}


class BodyTimeout(asyncio.TimeoutError):
    """The request body did not arrive within its deadline.

    An asyncio.TimeoutError, so that aiohttp, draining the unread rest of the body after the answer,
    stops there and closes the connection instead of logging an error.
    """


class BodyAbandoned(asyncio.TimeoutError):
    """The rest of a body the worker gave up on, one that did not decode (bad gzip, say).

    Set on the body after its 400 is answered: aiohttp, draining the rest, would read the
    decoding error again and log it as an unhandled exception with three tracebacks; an
    asyncio.TimeoutError makes it stop there quietly, as `BodyTimeout` does.
    """


def body_deadline(seconds: float) -> Middleware:
    """A middleware that refuses a request whose body is not received in `seconds` (408)."""

    @web.middleware
    async def deadline(request: web.Request, handler: Handler) -> web.StreamResponse:
        content = request.content
        if not request.body_exists or content.is_eof():
            return await handler(request)
        timer = asyncio.get_running_loop().call_later(seconds, _expire, content)
        try:
            return await handler(request)
        except BodyTimeout:
            logger.info("%s: body not received in %g s: 408", request.path, seconds)
            raise refusals.body_too_slow(seconds) from None
        finally:
            timer.cancel()

    return deadline


def _expire(content: StreamReader) -> None:
    if not content.is_eof():
        content.set_exception(BodyTimeout())
