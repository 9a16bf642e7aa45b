"""The model server as the rest of the worker sees it: one object with a few calls.

`ModelClient` is the only way to the model server. Requests travel on keep-alive connections
(pyworker.upstream.pool) with no cap on their number (a cap would throttle a thousand
concurrent generations), except for a server with a thread per connection: there the cap is
its threads (`max_connections`, or what the engine declares, `LimitProbe.spare_connections`).
Answers come back as the model server sent them (no decompression), bodies chunk by chunk as
they arrive; relaying them to the client is the serving layer's work
(pyworker.serving.relay). A route's custom handler gets an aiohttp session to the same server,
made only when first needed. Nothing outside this package sees the pool or that session, nor
their exceptions: every failure is one of upstream's own errors (pyworker.upstream.errors).
A model in the worker's own process is called the same way, through `call_function`
(pyworker.upstream.functions), with no model server at all.
"""

from __future__ import annotations

import aiohttp

from pyworker import backports
from pyworker.config import HandlerResult, JSONObject, ModelHandler, RouteFunction
from pyworker.config.encoded_body import EncodedBody
from pyworker.upstream.connection import Answer
from pyworker.upstream.errors import model_errors
from pyworker.upstream.functions import FunctionAnswer, FunctionRunner
from pyworker.upstream.pool import IDLE_TIMEOUT, ConnectionPool, Exchange

__all__ = ["Answer", "Exchange", "FunctionAnswer", "ModelClient"]

DISCARDED_LIMIT = 64 * 1024
"""Bytes of a health check's or a close route's answer read before its connection is dropped:
only the status matters, and a model server must not make the worker read on for ever."""


class ModelClient:
    """The worker's client of the model server.

    Every call, and every read of an answer it gives, fails with an `UpstreamError`
    (pyworker.upstream.errors): its class says what failed, its `status` and `message` what
    the client is told. Only what is the caller's or the template's own goes through as it
    is: a path that is not one (ValueError), a custom handler's own exceptions, and what a
    function's streamed chunks raise (its iterator's exceptions; TimeoutError past the
    timeout, in `collect_function` too).
    """

    __slots__ = (
        "_base_url",
        "_configured_limit",
        "_connect_timeout",
        "_functions",
        "_pool",
        "_session",
    )

    def __init__(
        self,
        base_url: str,
        connect_timeout: float,
        function_threads: int = 4,
        max_connections: int | None = None,
    ) -> None:
        self._base_url = base_url
        self._connect_timeout = connect_timeout
        self._pool = ConnectionPool(base_url, connect_timeout, max_connections=max_connections)
        self._configured_limit = max_connections is not None
        self._session: aiohttp.ClientSession | None = None
        self._functions = FunctionRunner(function_threads)

    def post(
        self, path: str, body: bytes | EncodedBody, read_timeout: float | None = None
    ) -> Exchange:
        """`async with model.post(path, body) as answer`: the `Answer`'s status and headers,
        then its body by `answer.next_chunk()` or `answer.read()`. `body` is JSON, or an
        `EncodedBody`; `path` goes under the base URL's path. A read timeout bounds the
        silence between bytes, not the whole answer."""
        return Exchange(self._pool, "POST", path, body, read_timeout)

    def get(self, path: str, read_timeout: float | None = None) -> Exchange:
        """`async with model.get(path) as answer`, as `post` without a body."""
        return Exchange(self._pool, "GET", path, b"", read_timeout)

    @property
    def max_connections(self) -> int | None:
        """The most connections held open to the model server at once (None: no cap)."""
        return self._pool.max_connections

    def limit_connections(self, limit: int) -> bool:
        """Cap the open connections at what the engine declared (its threads), unless the
        config set the cap; True when this one holds."""
        if self._configured_limit:
            return False
        self._pool.limit(limit)
        return True

    async def probe(self, path: str, timeout: float) -> int:
        """The status of a GET of the health `path`, its answer read whole within `timeout`;
        `UpstreamError` when there is none."""
        with model_errors():
            async with backports.timeout(timeout), self.get(path) as answer:
                await answer.discard(DISCARDED_LIMIT)
                return answer.status

    async def notify(self, path: str, body: bytes, timeout: float | None) -> int:
        """POST `body` to `path` when only its arrival matters (a session's close route): the
        answer is read (up to `DISCARDED_LIMIT` bytes), to free the connection, and dropped;
        its status is returned. `UpstreamError` when no answer comes within `timeout`."""
        with model_errors():
            async with backports.timeout(timeout), self.post(path, body) as answer:
                await answer.discard(DISCARDED_LIMIT)
                return answer.status

    async def call_handler(
        self, handler: ModelHandler, payload: JSONObject, timeout: float | None
    ) -> HandlerResult:
        """Run a route's custom handler with the aiohttp session, bounded by `timeout` in all."""
        with model_errors():
            async with backports.timeout(timeout):
                return await handler(self._client_session(), self._base_url, payload)

    async def call_function(
        self,
        function: RouteFunction,
        payload: JSONObject,
        timeout: float | None,
        stream_type: str = "application/x-ndjson",
    ) -> FunctionAnswer:
        """A route's function's answer (`FunctionFailed` when it has none): a stream's chunks
        are each bounded by `timeout`, a whole answer by it in all."""
        return await self._functions.run(function, payload, timeout, stream_type)

    async def collect_function(
        self, function: RouteFunction, payload: JSONObject, timeout: float | None
    ) -> HandlerResult:
        """A route's function's whole answer, a stream read to its end, within `timeout`."""
        return await self._functions.collect(function, payload, timeout)

    async def functions_idle(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds until no sync route function runs in the pool (one
        whose client left or timed out runs to its end); True if none does."""
        return await self._functions.wait_idle(timeout)

    async def close(self) -> None:
        """Close every connection (a request still running fails) and the handlers' session."""
        self._functions.close()
        self._pool.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=IDLE_TIMEOUT)
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout),
            )
        return self._session
