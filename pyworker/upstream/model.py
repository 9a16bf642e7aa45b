"""Forwarding a payload to the model server and relaying its answer to the client.

Requests travel on pyworker.upstream.connection_pool: keep-alive connections with no cap on their
number (a cap would throttle a thousand concurrent generations). Bodies are relayed as the
model server sent them (no decompression), streams chunk by chunk as they arrive. A route's
custom handler gets an aiohttp session to the same server, made only when first needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from pyworker import backports
from pyworker.config import HandlerResult, JSONObject, ModelHandler, ResponseHook
from pyworker.config.encoded_body import EncodedBody
from pyworker.upstream.connection_pool import (
    IDLE_TIMEOUT,
    Answer,
    ConnectFailed,
    ConnectionPool,
    ConnectTimedOut,
    PoolError,
    ReadTimedOut,
)

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


class UpstreamError(Exception):
    """The model server could not give an answer; `status` is what the client gets."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ClientGone(Exception):
    """The client closed its connection while its answer was being written."""


@dataclass(slots=True)
class Relayed:
    response: web.StreamResponse
    status: int
    """The model server's status, or 502 if its stream broke after the headers were sent."""
    body: bytes | None = None
    """The answer when it was buffered (not streamed), for produced-work accounting."""


class ModelClient:
    """The pooled HTTP client to the model server, and an aiohttp session for custom handlers."""

    def __init__(self, base_url: str, connect_timeout: float) -> None:
        self.base_url = base_url
        self.connect_timeout = connect_timeout
        self.pool = ConnectionPool(base_url, connect_timeout)
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=IDLE_TIMEOUT)
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout),
            )
        return self._session

    async def close(self) -> None:
        self.pool.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def relay(
        self,
        request: web.Request,
        path: str,
        body: bytes | EncodedBody,
        read_timeout: float | None,
        response_hook: ResponseHook | None = None,
    ) -> Relayed:
        with model_errors():
            async with self.pool.post(path, body, read_timeout) as upstream:
                if _is_stream(upstream):
                    return await _relay_stream(request, upstream)
                answer = await upstream.read()
        answer = await _apply_hook(response_hook, upstream.status, answer)
        response = web.Response(
            status=upstream.status, body=answer, headers=_relayed_headers(upstream.headers)
        )
        return Relayed(response, upstream.status, answer)

    async def call(
        self, handler: ModelHandler, payload: JSONObject, timeout: float | None
    ) -> HandlerResult:
        """Run a route's custom handler, bounded by `timeout` in all."""
        with model_errors():
            async with backports.timeout(timeout):
                return await handler(self.session, self.base_url, payload)

    async def relay_handler(
        self,
        handler: ModelHandler,
        payload: JSONObject,
        timeout: float | None,
        response_hook: ResponseHook | None = None,
    ) -> Relayed:
        result = await self.call(handler, payload, timeout)
        answer = await _apply_hook(response_hook, result.status, result.body)
        response = web.Response(
            status=result.status, body=answer, headers={"Content-Type": result.content_type}
        )
        return Relayed(response, result.status, answer)


@contextlib.contextmanager
def model_errors() -> Iterator[None]:
    """Turn a failed call to the model server into the `UpstreamError` the client gets."""
    try:
        yield
    except ConnectTimedOut:
        raise UpstreamError(502, "model server unreachable: connect timed out") from None
    except ConnectFailed as error:
        raise UpstreamError(502, f"model server unreachable: {error}") from None
    except ReadTimedOut:
        raise UpstreamError(504, "model server timed out") from None
    except PoolError as error:
        raise UpstreamError(502, f"model server failed: {error}") from None
    except aiohttp.ConnectionTimeoutError:
        raise UpstreamError(502, "model server unreachable: connect timed out") from None
    except aiohttp.ClientConnectorError as error:
        raise UpstreamError(502, f"model server unreachable: {error.os_error}") from None
    except (TimeoutError, asyncio.TimeoutError):
        raise UpstreamError(504, "model server timed out") from None
    except aiohttp.ClientError as error:
        raise UpstreamError(502, f"model server failed: {error.__class__.__name__}") from None


async def _apply_hook(hook: ResponseHook | None, status: int, answer: bytes) -> bytes:
    if hook is None:
        return answer
    changed = hook(status, answer)
    return await changed if inspect.isawaitable(changed) else changed


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
    status = upstream.status
    try:
        while chunk := await upstream.next_chunk():
            await response.write(chunk)
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        raise ClientGone from None
    except PoolError as error:
        # Headers are gone already: the only honest signal left is to cut the connection.
        logger.warning("model server stream broke after headers: %s", error.__class__.__name__)
        if request.transport is not None:
            request.transport.close()
        return Relayed(response, 502)
    try:
        await response.write_eof()
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        raise ClientGone from None
    return Relayed(response, status)
