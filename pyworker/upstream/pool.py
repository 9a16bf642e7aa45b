"""Keep-alive HTTP/1.1 connections to the model server: the request path's own client.

aiohttp's client costs more CPU per request than all the rest of the request path: it builds
a URL, a request object, a payload, a cookie jar lookup, trace hooks and a stream reader for
every call. The request path needs much less: one known origin, one kind of request (a POST
with a JSON body), the answer's status and headers, and its body as the chunks arrive. So
this pool writes each request in one call, lets httptools (llhttp) parse the answer
(pyworker.upstream.connection), and hands the body over chunk by chunk. Health checks, the
benchmark and session close calls use it too, so the model server sees one set of connections
from the worker: servers with a thread per connection (llama.cpp's has `n_parallel + 2`) run
out of threads when idle connections pile up in two pools. Custom route handlers get an
aiohttp session instead (pyworker.upstream.model).

Bounds: idle connections are capped and expire before common model servers close them (5 s
in uvicorn, vLLM and llama.cpp), so a request is never written into a connection the server
is closing.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from dataclasses import dataclass, field
from types import TracebackType
from urllib.parse import urlsplit

from pyworker import backports
from pyworker.config.encoded_body import EncodedBody
from pyworker.upstream.connection import Answer, Connection, State
from pyworker.upstream.errors import connect_errors

IDLE_TIMEOUT = 4.0
"""Seconds an idle connection is kept: under the 5 s keep-alive of uvicorn and llama.cpp."""
MAX_IDLE = 512
MAX_HEADS = 64
"""Request heads cached by path; paths come from the config, so a few are all there is."""
JSON_TYPE = "application/json"


@dataclass(frozen=True, slots=True)
class Origin:
    host: str
    port: int
    tls: bool
    prefix: str
    """The base URL's path ("" or "/v1"), put before every request path."""

    @classmethod
    def parse(cls, base_url: str) -> Origin:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        return cls(parts.hostname, port, tls, parts.path.rstrip("/"))

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(slots=True, eq=False)
class Exchange:
    """`async with Exchange(pool, "POST", path, body, read_timeout) as answer` (what
    `ModelClient.post` and `get` return): the connection goes back to the pool after."""

    _pool: ConnectionPool
    _method: str
    _path: str
    _body: bytes | EncodedBody
    _read_timeout: float | None
    _connection: Connection | None = field(default=None, init=False)

    async def __aenter__(self) -> Answer:
        pool = self._pool
        body = self._body
        if isinstance(body, EncodedBody):
            head = pool.head(self._method, self._path, body.length, body.content_type)
        else:
            head = pool.head(self._method, self._path, len(body))  # may refuse the path
        connection = pool.take_idle()
        if connection is None:
            connection = await pool.connect()
        self._connection = connection
        try:
            if isinstance(body, EncodedBody):
                return await connection.send_parts(head, body.parts, self._read_timeout)
            return await connection.send(head, body, self._read_timeout)
        except BaseException:
            self._connection = None
            pool.release(connection)  # not reusable: closed, and the model sees it
            raise

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        connection = self._connection
        if connection is not None:
            self._connection = None
            self._pool.release(connection)


class ConnectionPool:
    """Connections to one model server; as many as there are requests, idle ones reused."""

    def __init__(
        self,
        base_url: str,
        connect_timeout: float,
        max_idle: int = MAX_IDLE,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self.origin = Origin.parse(base_url)
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.opened = 0
        """Connections made so far: what the tests read to see reuse."""
        self._idle: deque[Connection] = deque()
        self._busy: set[Connection] = set()
        self._heads: dict[tuple[str, str], bytes] = {}
        self._tls: ssl.SSLContext | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    @property
    def idle(self) -> int:
        return len(self._idle)

    def head(self, method: str, path: str, length: int, content_type: str | None = None) -> bytes:
        """The request's head; all of it but the length is built once per method and path
        (a body of another type than JSON gets a head of its own: its boundary differs)."""
        if content_type is not None:
            return self._build_head(method, path, content_type) + b"%d\r\n\r\n" % length
        key = (method, path)
        start = self._heads.get(key)
        if start is None:
            start = self._build_head(method, path, JSON_TYPE if method == "POST" else None)
            if len(self._heads) < MAX_HEADS:
                self._heads[key] = start
        return start + b"%d\r\n\r\n" % length

    def _build_head(self, method: str, path: str, content_type: str | None) -> bytes:
        if not (path.startswith("/") and path.isascii() and path.isprintable()) or " " in path:
            raise ValueError(f"not a request path: {path!r}")  # no header injection
        type_line = f"Content-Type: {content_type}\r\n" if content_type else ""
        return (
            f"{method} {self.origin.prefix}{path} HTTP/1.1\r\n"
            f"Host: {self.origin.host_header}\r\n"
            f"{type_line}"
            "Accept-Encoding: identity\r\n"
            "User-Agent: pyworker\r\n"
            "Content-Length: "
        ).encode("latin-1")

    def take_idle(self) -> Connection | None:
        """The most recently used idle connection still fit to carry a request."""
        idle = self._idle
        if not idle:
            return None
        fresh_since = asyncio.get_running_loop().time() - self.idle_timeout
        while idle:
            connection = idle.pop()
            if connection.state is State.IDLE and connection.idle_since > fresh_since:
                self._busy.add(connection)
                return connection
            connection.close()  # closed by the server, or too old to trust
        return None

    async def connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        origin = self.origin
        tls = self._tls_context() if origin.tls else None
        with connect_errors():
            async with backports.timeout(self.connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: Connection(loop), origin.host, origin.port, ssl=tls
                )
        self.opened += 1
        self._busy.add(connection)
        return connection

    def release(self, connection: Connection) -> None:
        """Back to the pool if its answer was read whole and the server keeps it open."""
        self._busy.discard(connection)
        if not connection.reusable() or len(self._idle) >= self.max_idle:
            connection.close()
            return
        connection.state = State.IDLE
        connection.idle_since = asyncio.get_running_loop().time()
        self._idle.append(connection)
        if self._sweeper is None:
            self._schedule_sweep(connection.idle_since + self.idle_timeout)

    def close(self) -> None:
        """Close every connection, idle or busy (a busy one's request fails)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        while self._idle:
            self._idle.pop().close()
        for connection in list(self._busy):
            connection.close()
        self._busy.clear()

    def _schedule_sweep(self, when: float) -> None:
        self._sweeper = asyncio.get_running_loop().call_at(when, self._sweep)

    def _sweep(self) -> None:
        """Close the connections idle for too long; the oldest are on the left."""
        self._sweeper = None
        idle = self._idle
        now = asyncio.get_running_loop().time()
        while idle and (
            idle[0].state is not State.IDLE or idle[0].idle_since + self.idle_timeout <= now
        ):
            idle.popleft().close()
        if idle:
            self._schedule_sweep(idle[0].idle_since + self.idle_timeout)

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls
