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
is closing. Open connections are not capped unless `max_connections` is set: a server with a
thread per connection holds the thread while the connection is open, idle or not, so a
connection past its threads carries a request that waits, up to 20 s seen on llama-server
with 12 at once to 6 threads, while the others go on. At the cap a request waits instead
for the first connection to come free, in order of arrival (the connection is handed over).
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
from pyworker.upstream.errors import ConnectFailed, ReadTimedOut, connect_errors

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
    `ModelClient.post` and `get` return): the connection goes back to the pool after. A GET
    (a health check, the engine's limit) never waits at the pool's cap: a health check that
    waited behind long generations would fail a busy worker."""

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
        connection = await pool.acquire(self._read_timeout, urgent=self._method == "GET")
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
        max_connections: int | None = None,
    ) -> None:
        self.origin = Origin.parse(base_url)
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        """Open connections at most, idle ones included (None: no cap)."""
        self.opened = 0
        """Connections made so far: what the tests read to see reuse."""
        self._idle: deque[Connection] = deque()
        self._busy: set[Connection] = set()
        self._waiters: deque[asyncio.Future[Connection | None]] = deque()
        """Requests waiting for a connection at the cap, first come first served: each gets
        a connection, or None where one closed (its place is theirs to connect)."""
        self._placed = 0
        """Places at the cap held for a connection being made (or about to be)."""
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

    @property
    def waiting(self) -> int:
        return sum(1 for waiter in self._waiters if not waiter.done())

    def limit(self, max_connections: int) -> None:
        """Set the cap; where it grew, the first in line connect in the new places."""
        self.max_connections = max_connections
        while self._waiters and self.open_connections() < max_connections:
            self._pass_place()

    def open_connections(self) -> int:
        return len(self._busy) + len(self._idle) + self._placed

    async def acquire(self, wait_timeout: float | None = None, urgent: bool = False) -> Connection:
        """An idle connection, else a new one, else (at `max_connections`) the first to come
        free; the wait is bounded by `wait_timeout` (ReadTimedOut past it). An `urgent` call
        never waits: it may go one over the cap, and its connection is closed after."""
        limit = self.max_connections
        if limit is None or urgent or not self._waiters:
            connection = self.take_idle()
            if connection is not None:
                return connection
            if urgent:
                return await self.connect()
            if limit is None or self.open_connections() < limit:
                return await self._connect_placed()
        connection = await self._wait_turn(wait_timeout)
        if connection is not None:
            return connection
        return await self._connect_placed(held=True)

    async def _connect_placed(self, held: bool = False) -> Connection:
        """`connect`, its place at the cap counted while the connection is being made."""
        if not held:
            self._placed += 1
        try:
            connection = await self.connect()
        except BaseException:
            self._placed -= 1
            self._pass_place()
            raise
        self._placed -= 1
        return connection

    async def _wait_turn(self, timeout: float | None) -> Connection | None:
        waiter: asyncio.Future[Connection | None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with backports.timeout(timeout):
                return await waiter
        except BaseException as error:
            if not waiter.done() or waiter.cancelled():
                waiter.cancel()  # skipped when its turn comes
            elif (handed := waiter.result()) is not None:
                self._busy.add(handed)  # given, not taken: back to the next in line
                handed.state = State.DONE
                self.release(handed)
            else:
                self._placed -= 1
                self._pass_place()
            if isinstance(error, TimeoutError | asyncio.TimeoutError):
                raise ReadTimedOut("no connection to the model server came free") from None
            raise

    def _next_waiter(self) -> asyncio.Future[Connection | None] | None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                return waiter
        return None

    def _pass_place(self) -> None:
        """A place at the cap came free: the first waiter connects in it."""
        limit = self.max_connections
        if limit is not None and self.open_connections() < limit:
            waiter = self._next_waiter()
            if waiter is not None:
                self._placed += 1
                waiter.set_result(None)

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
        limit = self.max_connections
        surplus = limit is not None and self.open_connections() >= limit  # an urgent one's
        if surplus or not connection.reusable() or len(self._idle) >= self.max_idle:
            connection.close()
            self._pass_place()
            return
        if (waiter := self._next_waiter()) is not None:
            connection.state = State.IDLE
            self._busy.add(connection)
            waiter.set_result(connection)
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
        while (waiter := self._next_waiter()) is not None:
            waiter.set_exception(ConnectFailed("the worker closed its connections"))

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
            self._pass_place()
        if idle:
            self._schedule_sweep(idle[0].idle_since + self.idle_timeout)

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls
