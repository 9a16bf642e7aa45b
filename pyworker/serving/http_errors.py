"""JSON answers for everything aiohttp would answer with a plain-text page.

A client of the worker always gets `{"error": ...}` with the right status, whatever went wrong:
an unknown path (404) or method (405) through `json_errors`, a request aiohttp could not parse
(400) or a handler that raised (500) through `JsonErrorRunner`'s connection handlers, and a
body refused before it is sent through `expect_handler`: a client that asks
`Expect: 100-continue` for a body over the limit gets 413 at once, never `100 Continue`
first (which would make it send the whole body for nothing).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus

from aiohttp import web
from aiohttp.http import HttpVersion11
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from aiohttp.web_request import BaseRequest

from pyworker.serving import refusals
from pyworker.serving.aiohttp_internals import RemadeServerRunner, connection_handler, remake_server
from pyworker.serving.limits import BodyAbandoned
from pyworker.serving.refusals import render
from pyworker.serving.responses import json_response

logger = logging.getLogger(__name__)

ExpectHandler = Callable[[web.Request], Awaitable[web.StreamResponse | None]]
KEPT_HEADERS = ("Allow", "Retry-After", "WWW-Authenticate")


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn aiohttp's HTTP errors (404, 405, 413...) and unexpected exceptions into JSON."""
    try:
        return await handler(request)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        response = json_response(error.status, {"error": _phrase(error.status)})
        for name in KEPT_HEADERS:
            if name in error.headers:
                response.headers[name] = error.headers[name]
        return response
    except (HttpProcessingError, RequestPayloadError) as error:  # e.g. bad gzip
        problem = error.__cause__ if isinstance(error.__cause__, HttpProcessingError) else error
        logger.info(
            "malformed request body from %s: %s (400)", request.remote, type(problem).__name__
        )
        request.content.set_exception(BodyAbandoned())
        return render(refusals.malformed_body())
    except Exception:
        logger.exception("%s %s failed inside the worker", request.method, request.path)
        return render(refusals.internal_error())


def _phrase(http_status: int) -> str:
    try:
        return HTTPStatus(http_status).phrase.lower()
    except ValueError:
        return "error"


def expect_handler(max_body: int) -> ExpectHandler:
    """Answer `Expect: 100-continue`: 413 for a declared body over `max_body`, else continue."""

    async def expect(request: web.Request) -> web.StreamResponse | None:
        if request.version != HttpVersion11:
            return None
        expectation = request.headers.get("Expect", "")
        # A refusal closes the connection: the client may send the body anyway.
        if expectation.lower() != "100-continue":
            return render(refusals.expectation_failed())
        if request.content_length is not None and request.content_length > max_body:
            return render(refusals.body_too_large(max_body))
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the interim answer is not the answer
        return None

    return expect


class _JsonErrorRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering malformed requests and crashes in JSON."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; raises once an answer began
        body = {"error": "malformed HTTP request" if status == 400 else _phrase(status)}
        if isinstance(exc, HttpProcessingError):
            body["problem"] = type(exc).__name__
        response = json_response(status, body)
        response.force_close()
        return response


class JsonErrorServer(web.Server):
    """aiohttp's server, whose connections answer malformed requests and crashes in JSON."""

    def __call__(self) -> RequestHandler:
        return connection_handler(self, _JsonErrorRequestHandler)


class JsonErrorRunner(RemadeServerRunner):
    """An `AppRunner` whose connections answer even unparseable requests in JSON."""

    def remake_server(self, server: web.Server) -> web.Server:
        return remake_server(server, JsonErrorServer)
