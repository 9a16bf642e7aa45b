"""One keep-alive HTTP/1.1 connection to the model server, and the answer it carries.

Each request is written in one call (or, for a body in parts, a slice at a time as the socket
drains, so it is never copied whole into the transport's buffer), and httptools (llhttp) parses
the answer: its status and headers first, then its body handed over as the chunks arrive. A
streamed body is buffered up to a high-water mark, then the socket is paused. If the model
server answers before it has the whole body, the rest is not sent and the connection is not
reused. Connections are made, reused and closed by pyworker.upstream.pool. Every failure ends
the answer with one of upstream's own errors (pyworker.upstream.errors); a write that fails is
one too, as the transport reports it: the connection lost (`Disconnected`).

The answer's framing is enforced, so that what one answer's bytes say can never become another
answer (RFC 9112 section 6): a byte past its end (after its Content-Length, its last chunk, or
a 204 or 304 head) closes the connection and reaches no client, the answer itself kept whole;
a Content-Length beside Transfer-Encoding, or a transfer coding other than one `chunked`, is
refused (502) and the connection closed; 1xx answers before the real one are skipped; an
answer with neither length nor chunking ends with the connection, which is not reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import cast

import httptools

from pyworker.config.encoded_body import BodyPart
from pyworker.upstream.errors import BadAnswer, Disconnected, ReadTimedOut, UpstreamError

logger = logging.getLogger(__name__)

HIGH_WATER = 256 * 1024
"""Body bytes buffered from the model server before its socket is paused."""
MAX_HEAD = 1024 * 1024
"""Bytes received before the answer's headers end; llhttp itself sets no bound on headers."""
JOIN_LIMIT = 64 * 1024
"""Bodies up to this size are sent in one write with the head; larger ones are not copied."""
WRITE_SLICE = 256 * 1024
"""Bytes of a body in parts handed to the transport at once, before waiting for it to drain."""


NO_BODY_STATUSES = frozenset({204, 304})
"""Answers that end with their head whatever their headers say (RFC 9112 section 6.3)."""


class _Stop(Exception):
    """Raised in a parser callback to stop llhttp at once; `data_received` handles it."""


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


@dataclass(slots=True, eq=False)
class Answer:
    """The model server's answer: status and headers now, the body as it arrives."""

    _connection: Connection
    status: int
    headers: list[tuple[str, str]]
    content_length: int | None
    content_type: str

    @property
    def complete(self) -> bool:
        """Whether the whole answer has arrived (read or not)."""
        return self._connection.complete

    async def next_chunk(self) -> bytes:
        """The body bytes received since the last call; b"" once the body is complete."""
        return await self._connection.next_chunk()

    async def discard(self, limit: int) -> None:
        """Read the body and drop it, up to `limit` bytes: an answer only its status matters
        for. Past `limit` it is not read on, and its connection is closed, not reused."""
        read = 0
        while read <= limit and (chunk := await self._connection.next_chunk()):
            read += len(chunk)

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
        self._error: UpstreamError | None = None
        self._read_timeout: float | None = None
        self._last_data = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._writer: asyncio.Task[None] | None = None
        self._body_unsent = False
        self._write_paused = False
        self._writable: asyncio.Future[None] | None = None
        self._refusal: UpstreamError | None = None
        """Why a callback stopped the parser: the answer fails with it (None: bytes past the
        answer's end, which is kept)."""

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
            self._beyond_answer()  # bytes nobody asked for: this connection cannot be trusted
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
            refusal, self._refusal = self._refusal, None
            if refusal is None and self._complete:
                self._beyond_answer()
            else:
                self._fail(refusal or BadAnswer(f"the model server's answer is not HTTP: {error}"))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state is State.BODY and self._until_close():
            self._message_done(keep_alive=False)  # a body delimited by the close is complete
        self._closed(Disconnected("the model server closed the connection"))

    # --- httptools callbacks ------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._complete:
            raise _Stop  # a second answer after the whole first: never anyone's answer

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.state is State.WAITING:  # not a chunked body's trailers: those are dropped
            self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            self._informational = True  # 100 Continue and the like: the answer follows
            self._headers = []
            return
        length: int | None = None
        codings: list[str] = []
        content_type = ""
        for name, value in self._headers:
            lowered = name.lower()
            if lowered == "content-length":
                length = int(value) if value.isascii() and value.isdigit() else None
            elif lowered == "content-type":
                content_type = value.partition(";")[0].strip().lower()
            elif lowered == "transfer-encoding":
                codings.extend(coding.strip().lower() for coding in value.split(","))
        if codings:
            self._check_codings(codings)
            length = None
        if status in NO_BODY_STATUSES:
            length = 0
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
    def _check_codings(self, codings: list[str]) -> None:
        """Only a lone `chunked` is relayed: any other coding would reach the client
        undecoded, and a length beside it is how responses are smuggled (llhttp refuses
        that too; this holds whatever its leniency)."""
        if any(name.lower() == "content-length" for name, _ in self._headers):
            self._refusal = BadAnswer("the model server sent Content-Length with Transfer-Encoding")
            raise _Stop
        if codings != ["chunked"]:
            shown = ", ".join(codings)[:100]
            self._refusal = BadAnswer(
                f"the model server's transfer coding {shown!r} is not chunked"
            )
            raise _Stop

    def _beyond_answer(self) -> None:
        """Bytes after the whole answer: dropped with the connection; the answer stays whole."""
        if self.state is not State.CLOSED:
            logger.warning(
                "the model server sent bytes past the end of its answer: connection closed"
            )
            self.close()

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

    def _fail(self, error: UpstreamError) -> None:
        if self.transport is not None and self.state is not State.CLOSED:
            self.transport.abort()
        self._closed(error)

    def _closed(self, error: UpstreamError) -> None:
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
            self._fail(ReadTimedOut())  # no byte for the whole read timeout
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
