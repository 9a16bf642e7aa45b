"""Keep-alive HTTP/1.1 connections to the model server: the request path's own client.

aiohttp's client costs more CPU per request than all the rest of the request path: it builds
a URL, a request object, a payload, a cookie jar lookup, trace hooks and a stream reader for
every call. The request path needs much less: one known origin, one kind of request (a POST
with a JSON body), the answer's status and headers, and its body as the chunks arrive. So
this pool writes each request in one call, lets httptools (llhttp) parse the answer, and
hands the body over chunk by chunk. Health checks, the benchmark and session close calls use
it too, so the model server sees one set of connections from the worker: servers with a
thread per connection (llama.cpp's has `n_parallel + 2`) run out of threads when idle
connections pile up in two pools. Custom route handlers get an aiohttp session instead.

Bounds: idle connections are capped and expire before common model servers close them (5 s
in uvicorn, vLLM and llama.cpp), so a request is never written into a connection the server
is closing; a streamed body is buffered up to a high-water mark, then the socket is paused.
A request body in parts (`EncodedBody`, a multipart upload) is written a slice at a time,
waiting while the socket's send buffer is full, so it is never copied whole into the
transport's buffer; if the model server answers before it has all of it, the rest is not sent
and the connection is not reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from types import TracebackType
from typing import cast
from urllib.parse import urlsplit

import httptools

from pyworker import backports
from pyworker.config.encoded_body import BodyPart, EncodedBody

IDLE_TIMEOUT = 4.0
"""Seconds an idle connection is kept: under the 5 s keep-alive of uvicorn and llama.cpp."""
MAX_IDLE = 512
HIGH_WATER = 256 * 1024
"""Body bytes buffered from the model server before its socket is paused."""
MAX_HEAD = 1024 * 1024
"""Bytes received before the answer's headers end; llhttp itself sets no bound on headers."""
JOIN_LIMIT = 64 * 1024
"""Bodies up to this size are sent in one write with the head; larger ones are not copied."""
MAX_HEADS = 64
"""Request heads cached by path; paths come from the config, so a few are all there is."""
WRITE_SLICE = 256 * 1024
"""Bytes of a body in parts handed to the transport at once, before waiting for it to drain."""
JSON_TYPE = "application/json"


class PoolError(Exception):
    """The model server did not give a whole answer."""


class ConnectFailed(PoolError):
    """No connection: refused, unreachable, or the name does not resolve."""


class ConnectTimedOut(PoolError):
    """The connection was not made within the connect timeout."""


class ReadTimedOut(PoolError):
    """The model server sent nothing for the whole read timeout."""


class Disconnected(PoolError):
    """The model server closed the connection before its answer was complete."""


class BadAnswer(PoolError):
    """The model server's bytes are not an HTTP/1.x answer."""


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


class State(Enum):
    IDLE = "idle"
    """In the pool, or just made: no request outstanding."""
    WAITING = "waiting"
    """Request written, no answer headers yet."""
    BODY = "body"
    """Answer headers received, body (maybe) still coming."""
    DONE = "done"
    """Whole answer received; back to IDLE when released, if the server keeps it alive."""
    CLOSED = "closed"


class Answer:
    """The model server's answer: status and headers now, the body as it arrives."""

    __slots__ = ("_connection", "content_length", "content_type", "headers", "status")

    def __init__(
        self,
        connection: Connection,
        status: int,
        headers: list[tuple[str, str]],
        content_length: int | None,
        content_type: str,
    ) -> None:
        self._connection = connection
        self.status = status
        self.headers = headers
        self.content_length = content_length
        self.content_type = content_type

    @property
    def complete(self) -> bool:
        """Whether the whole answer has arrived (read or not)."""
        return self._connection.complete

    async def next_chunk(self) -> bytes:
        """The body bytes received since the last call; b"" once the body is complete."""
        return await self._connection.next_chunk()

    async def read(self) -> bytes:
        parts: list[bytes] = []
        while chunk := await self._connection.next_chunk():
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)


class Connection(asyncio.Protocol):
    """One connection to the model server, carrying one request at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.state = State.IDLE
        self.idle_since = 0.0
        self.keep_alive = False
        self._headers: list[tuple[str, str]] = []
        self._informational = False
        self._answer: asyncio.Future[Answer] | None = None
        self._complete = False
        self._head_bytes = 0
        self._body: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._error: PoolError | None = None
        self._read_timeout: float | None = None
        self._last_data = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._writer: asyncio.Task[None] | None = None
        self._body_unsent = False
        self._write_paused = False
        self._writable: asyncio.Future[None] | None = None

    # --- used by the pool ---------------------------------------------------------------
    def send(self, head: bytes, body: bytes, read_timeout: float | None) -> asyncio.Future[Answer]:
        answer = self._begin(read_timeout)
        assert self.transport is not None
        if len(body) <= JOIN_LIMIT:
            self.transport.write(head + body)  # one segment; copying a small body is cheap
        else:
            self.transport.writelines((head, body))
        return answer

    def send_parts(
        self, head: bytes, parts: Sequence[BodyPart], read_timeout: float | None
    ) -> asyncio.Future[Answer]:
        """Send a body in parts, a slice at a time as the socket drains; see the module doc."""
        answer = self._begin(read_timeout)
        assert self.transport is not None
        self.transport.write(head)
        self._body_unsent = True
        self._writer = self._loop.create_task(self._write_parts(parts))
        return answer

    def _begin(self, read_timeout: float | None) -> asyncio.Future[Answer]:
        assert self.transport is not None and self.state is State.IDLE
        self.state = State.WAITING
        self._answer = self._loop.create_future()
        self._headers = []
        self._complete = False
        self._head_bytes = 0
        self._body = []
        self._buffered = 0
        self._error = None
        if self._paused:  # the last answer ended while its unread body held reading paused
            self._paused = False
            self.transport.resume_reading()
        self._read_timeout = read_timeout
        if read_timeout is not None:
            self._last_data = self._loop.time()
            self._timer = self._loop.call_at(self._last_data + read_timeout, self._check_timeout)
        return self._answer

    async def _write_parts(self, parts: Sequence[BodyPart]) -> None:
        for part in parts:
            view = memoryview(part).cast("B")
            for start in range(0, len(view), WRITE_SLICE):
                transport = self.transport
                if self.state is not State.WAITING or transport is None or transport.is_closing():
                    return  # answered already, or gone: the rest is not needed
                try:
                    transport.write(view[start : start + WRITE_SLICE])
                except (OSError, RuntimeError):  # uvloop's closed transport raises
                    return  # connection_lost follows and fails the answer
                if self._write_paused:
                    self._writable = self._loop.create_future()
                    try:
                        await self._writable
                    finally:
                        self._writable = None
        self._body_unsent = False

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_writer()

    def _wake_writer(self) -> None:
        writable = self._writable
        if writable is not None and not writable.done():
            writable.set_result(None)

    @property
    def complete(self) -> bool:
        return self._complete

    def reusable(self) -> bool:
        return self.state is State.DONE and self.keep_alive and not self._body_unsent

    def close(self) -> None:
        """Drop the connection now: the model server sees the request abandoned."""
        self._fail(Disconnected("connection closed by the worker"))

    async def next_chunk(self) -> bytes:
        while not self._body:
            if self._complete:
                return b""
            if self._error is not None:
                raise self._error
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        body = self._body
        chunk = body[0] if len(body) == 1 else b"".join(body)
        self._body = []
        self._buffered = 0
        if self._paused and self.transport is not None and self.state is not State.CLOSED:
            self._paused = False
            self.transport.resume_reading()
            self._restart_timer()
        return chunk

    # --- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.state is not State.WAITING and self.state is not State.BODY:
            self.close()  # bytes nobody asked for: this connection cannot be trusted
            return
        if self._read_timeout is not None:
            self._last_data = self._loop.time()
        if self.state is State.WAITING:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD:
                self._fail(BadAnswer(f"the model server's answer head is over {MAX_HEAD} bytes"))
                return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(BadAnswer("the model server switched protocols"))
        except httptools.HttpParserError as error:
            self._fail(BadAnswer(f"the model server's answer is not HTTP: {error}"))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state is State.BODY and self._until_close():
            self._message_done(keep_alive=False)  # a body delimited by the close is complete
        self._closed(Disconnected("the model server closed the connection"))

    # --- httptools callbacks ------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            self._informational = True  # 100 Continue and the like: the answer follows
            self._headers = []
            return
        length: int | None = None
        chunked = False
        content_type = ""
        for name, value in self._headers:
            lowered = name.lower()
            if lowered == "content-length":
                length = int(value) if value.isdigit() else None
            elif lowered == "content-type":
                content_type = value.partition(";")[0].strip().lower()
            elif lowered == "transfer-encoding":
                chunked = True
        if chunked:
            length = None
        self.state = State.BODY
        answer = self._answer
        if answer is not None and not answer.done():
            answer.set_result(Answer(self, status, self._headers, length, content_type))

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
            self._stop_timer()
        self._wake()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self._message_done(self._parser.should_keep_alive())

    # --- internals ----------------------------------------------------------------------
    def _until_close(self) -> bool:
        """Whether the answer's body ends where the connection does (no length, not chunked)."""
        for name, _ in self._headers:
            if name.lower() in ("content-length", "transfer-encoding"):
                return False
        return True

    def _message_done(self, keep_alive: bool) -> None:
        self.state = State.DONE
        self._complete = True
        self.keep_alive = keep_alive
        self._stop_timer()
        self._wake()

    def _fail(self, error: PoolError) -> None:
        if self.transport is not None and self.state is not State.CLOSED:
            self.transport.abort()
        self._closed(error)

    def _closed(self, error: PoolError) -> None:
        """The connection is gone; an answer still coming fails with `error`."""
        self._stop_timer()
        if self.state is State.CLOSED:
            return
        if self.state is State.WAITING or self.state is State.BODY:
            self._error = error
            answer = self._answer
            if answer is not None and not answer.done():
                answer.set_exception(error)
        self.state = State.CLOSED
        self.keep_alive = False
        self._wake()
        self._wake_writer()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _check_timeout(self) -> None:
        self._timer = None
        timeout = self._read_timeout
        if timeout is None or self._paused:
            return
        silent_until = self._last_data + timeout
        if self._loop.time() >= silent_until:
            self._fail(ReadTimedOut(f"no byte from the model server in {timeout:g}s"))
        else:
            self._timer = self._loop.call_at(silent_until, self._check_timeout)

    def _restart_timer(self) -> None:
        timeout = self._read_timeout
        if timeout is not None and self._timer is None and self.state is State.BODY:
            self._last_data = self._loop.time()
            self._timer = self._loop.call_at(self._last_data + timeout, self._check_timeout)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class Exchange:
    """`async with pool.post(...) as answer`: the connection goes back to the pool after."""

    __slots__ = ("_body", "_connection", "_method", "_path", "_pool", "_read_timeout")

    def __init__(
        self,
        pool: ConnectionPool,
        method: str,
        path: str,
        body: bytes | EncodedBody,
        read_timeout: float | None,
    ) -> None:
        self._pool = pool
        self._method = method
        self._path = path
        self._body = body
        self._read_timeout = read_timeout
        self._connection: Connection | None = None

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

    def post(
        self, path: str, body: bytes | EncodedBody, read_timeout: float | None = None
    ) -> Exchange:
        """POST `body` (JSON, or an `EncodedBody`) to the model server's `path`, under the base
        URL's path."""
        return Exchange(self, "POST", path, body, read_timeout)

    def get(self, path: str, read_timeout: float | None = None) -> Exchange:
        return Exchange(self, "GET", path, b"", read_timeout)

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
        try:
            async with backports.timeout(self.connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: Connection(loop), origin.host, origin.port, ssl=tls
                )
        except (TimeoutError, asyncio.TimeoutError):
            raise ConnectTimedOut(
                f"no connection to {origin.host_header} in {self.connect_timeout:g}s"
            ) from None
        except OSError as error:
            raise ConnectFailed(error.strerror or str(error)) from None
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
