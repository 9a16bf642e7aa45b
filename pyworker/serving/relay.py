"""Relaying the model server's answer to the client.

An answer of known length up to `BUFFERED_LIMIT` that is not a stream type is read whole,
passed through the route's response hook, and sent in one response. Any other is streamed:
its headers sent at once, its body chunk by chunk as it arrives from the model server. Bodies
go as the model server sent them (no decompression); headers of one hop are dropped.

When there is no answer to relay (the model server unreachable, timed out, broken; a function
that raised), `relay_route` raises `Refused`: `model_refusal` is the one place an upstream
failure becomes a refusal.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from pyworker.config import JSONObject, ModelHandler, ResponseHook, RouteConfig
from pyworker.config.encoded_body import EncodedBody
from pyworker.config.hooks import call_hook
from pyworker.serving import refusals
from pyworker.upstream.errors import UpstreamError
from pyworker.upstream.functions import FunctionAnswer
from pyworker.upstream.model import Answer, ModelClient

logger = logging.getLogger(__name__)

# Headers that describe one hop, or that aiohttp recomputes for the body it sends.
DROPPED_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "date",
        "server",
    }
)
STREAM_TYPES = ("text/event-stream", "application/x-ndjson", "application/jsonl")
BUFFERED_LIMIT = 8 * 1024 * 1024


class ClientGone(Exception):
    """The client closed its connection while its answer was being written."""


@dataclass(slots=True)
class Relayed:
    response: web.StreamResponse
    http_status: int
    """The model server's status, or 502 if its stream broke after the headers were sent."""


async def relay_route(
    model: ModelClient,
    request: web.Request,
    route: RouteConfig,
    payload: JSONObject,
    forwarded: bytes | EncodedBody,
) -> Relayed:
    """The answer of `route`: its function's, its handler's, or the model server's. Raises
    `Refused` when there is none, `ClientGone` when the client leaves while a stream is written."""
    try:
        if route.function is not None:
            return await relay_function(model, request, route, payload)
        if route.handler is not None:
            return await relay_handler(
                model, route.handler, payload, route.read_timeout, route.response_hook
            )
        return await relay(
            model, request, route.model_path, forwarded, route.read_timeout, route.response_hook
        )
    except UpstreamError as error:  # a function's failure (FunctionFailed) is one too
        raise model_refusal(error) from None


def model_refusal(error: UpstreamError) -> refusals.Refused:
    """What the client is told when the model server or the route's function gave no answer."""
    return refusals.model_failed(error.status, error.message)


async def relay(
    model: ModelClient,
    request: web.Request,
    path: str,
    body: bytes | EncodedBody,
    read_timeout: float | None,
    response_hook: ResponseHook | None = None,
) -> Relayed:
    """POST `body` to the model server's `path` and answer `request` with what it says.

    Raises `UpstreamError` when the model server gives no answer, `ClientGone` when the client
    leaves while a stream is written."""
    async with model.post(path, body, read_timeout) as upstream:
        if _is_stream(upstream):
            return await _relay_stream(request, upstream)
        answer = await upstream.read()
    answer = await _apply_hook(response_hook, upstream.status, answer)
    response = web.Response(
        status=upstream.status, body=answer, headers=_relayed_headers(upstream.headers)
    )
    return Relayed(response, upstream.status)


async def relay_handler(
    model: ModelClient,
    handler: ModelHandler,
    payload: JSONObject,
    timeout: float | None,
    response_hook: ResponseHook | None = None,
) -> Relayed:
    """The answer of a route's custom handler, run bounded by `timeout` in all."""
    result = await model.call_handler(handler, payload, timeout)
    answer = await _apply_hook(response_hook, result.status, result.body)
    response = web.Response(
        status=result.status, body=answer, headers={"Content-Type": result.content_type}
    )
    return Relayed(response, result.status)


async def relay_function(
    model: ModelClient, request: web.Request, route: RouteConfig, payload: JSONObject
) -> Relayed:
    """The answer of a route's function, in the worker's own process: whole, through the
    response hook, or streamed chunk by chunk. Raises `FunctionFailed` when there is none,
    `ClientGone` when the client leaves while a stream is written."""
    assert route.function is not None
    answer = await model.call_function(
        route.function, payload, route.read_timeout, route.stream_type
    )
    if answer.chunks is not None:
        return await _relay_chunks(request, answer)
    body = await _apply_hook(route.response_hook, answer.status, answer.body)
    response = web.Response(
        status=answer.status, body=body, headers={"Content-Type": answer.content_type}
    )
    return Relayed(response, answer.status)


async def _relay_chunks(request: web.Request, answer: FunctionAnswer) -> Relayed:
    assert answer.chunks is not None
    response = web.StreamResponse(status=answer.status)
    response.content_type = answer.content_type
    try:
        await response.prepare(request)
        async for chunk in answer.chunks:
            await response.write(chunk)
        await response.write_eof()
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        raise ClientGone from None
    except Exception as error:
        # Headers are gone already: the only honest signal left is to cut the connection.
        logger.warning("function's stream broke after headers: %s", describe(error))
        if request.transport is not None:
            request.transport.close()
        return Relayed(response, 500)
    finally:
        await answer.chunks.aclose()  # the function's own generator ends now, not at GC
    return Relayed(response, answer.status)


def describe(error: BaseException) -> str:
    return getattr(error, "message", None) or error.__class__.__name__


async def _apply_hook(hook: ResponseHook | None, http_status: int, answer: bytes) -> bytes:
    if hook is None:
        return answer
    return await call_hook(hook, http_status, answer)


def _is_stream(upstream: Answer) -> bool:
    length = upstream.content_length
    if length is None or length > BUFFERED_LIMIT:
        return True
    return upstream.content_type in STREAM_TYPES


def _relayed_headers(headers: list[tuple[str, str]]) -> CIMultiDict[str]:
    return CIMultiDict(
        (name, value) for name, value in headers if name.lower() not in DROPPED_HEADERS
    )


async def _relay_stream(request: web.Request, upstream: Answer) -> Relayed:
    response = web.StreamResponse(
        status=upstream.status, headers=_relayed_headers(upstream.headers)
    )
    if upstream.content_length is not None:
        response.content_length = upstream.content_length
    try:
        await response.prepare(request)
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        raise ClientGone from None
    http_status = upstream.status
    try:
        while chunk := await upstream.next_chunk():
            await response.write(chunk)
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        raise ClientGone from None
    except UpstreamError as error:
        # Headers are gone already: the only honest signal left is to cut the connection.
        logger.warning("model server stream broke after headers: %s", error.__class__.__name__)
        if request.transport is not None:
            request.transport.close()
        return Relayed(response, 502)
    try:
        await response.write_eof()
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        raise ClientGone from None
    return Relayed(response, http_status)
