"""A cap on client connections, below the descriptor limit, with a reserve for the worker's own.

When clients take every file descriptor, the worker's own connections fail too: the model
server's, the reporter's, the health checks'. So at start the soft RLIMIT_NOFILE is raised to
the hard one, and client connections are capped well below it (`DescriptorBudget`): what is
left covers the descriptors already open, one accept batch (the listen backlog), and one
model-server connection per client connection plus a fixed reserve for the worker's own.

Beyond the cap (`CappedServer`), the longest-open idle client connection is closed to make
room (a client reconnects; an idle one costs the worker a descriptor for nothing); when every
connection is busy, the new one is answered `503` with `Retry-After` and closed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from pyworker.serving.aiohttp_internals import RemadeServerRunner, between_requests, remake_server
from pyworker.serving.http_errors import JsonErrorServer

logger = logging.getLogger(__name__)

OWN_RESERVE = 64
"""Descriptors kept for the worker itself: reporter, health checks, key fetch, log, NVML."""
MIN_CONNECTIONS = 16
REFUSAL_LINGER = 0.5
MAX_LINGERING = 64
MAX_BACKLOG = 1024
UNLIMITED_DESCRIPTORS = 1 << 20
"""What an unlimited hard limit is raised to (the kernel refuses more than nr_open anyway)."""
_REFUSAL_BODY = b'{"error":"too many open connections"}'
REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    b"Retry-After: 1\r\n"
    b"Connection: close\r\n"
    b"Content-Length: " + str(len(_REFUSAL_BODY)).encode() + b"\r\n"
    b"\r\n" + _REFUSAL_BODY
)


def raise_descriptor_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one; the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = UNLIMITED_DESCRIPTORS if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as error:
            logger.warning("file descriptor limit stays %d: %s", soft, error)
    return UNLIMITED_DESCRIPTORS if soft == resource.RLIM_INFINITY else soft


def open_descriptors() -> int:
    """Descriptors this process has open now (0 where /proc is not there to count them)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


@dataclass(frozen=True, slots=True)
class DescriptorBudget:
    """How the descriptor limit is shared between clients and the worker's own needs."""

    limit: int
    backlog: int
    max_connections: int

    @classmethod
    def plan(cls, limit: int, in_use: int, configured: int | None = None) -> DescriptorBudget:
        """Each client may need two descriptors (its own and one to the model server)."""
        backlog = min(max(limit // 8, 16), MAX_BACKLOG)
        room = (limit - in_use - backlog - OWN_RESERVE) // 2
        cap = max(room, MIN_CONNECTIONS)
        if configured is not None:
            cap = min(configured, cap)
        return cls(limit, backlog, cap)


class _Refusal(asyncio.Protocol):
    """A connection over the cap: answered 503 at once, then closed.

    Closing a socket with unread request bytes makes the kernel reset the connection, and the
    client may lose the 503 it was sent: so the refusal reads and drops what comes, until the
    client closes or `REFUSAL_LINGER` seconds pass. At most `MAX_LINGERING` refusals linger
    at once; beyond them a connection is closed as soon as it is answered.
    """

    lingering = 0

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._transport.write(REFUSAL)
        if _Refusal.lingering >= MAX_LINGERING:
            self._transport.close()
            return
        _Refusal.lingering += 1
        self._timer = asyncio.get_running_loop().call_later(REFUSAL_LINGER, self._close)

    def data_received(self, data: bytes) -> None:
        pass  # the request is not served: its bytes are dropped

    def eof_received(self) -> bool:
        self._close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._close()

    def _close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            _Refusal.lingering -= 1
        if self._transport is not None:
            self._transport.close()
            self._transport = None


class CappedServer(JsonErrorServer):
    """aiohttp's server (answering malformed requests in JSON), holding at most
    `max_connections` client connections open."""

    def __init__(self, *args: Any, max_connections: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_connections = max_connections
        self.open_connections = 0
        self.refused = 0
        """Connections answered 503 because every connection was busy."""
        self.closed_idle = 0
        """Idle connections closed to make room for a new one."""
        self._pending = 0

    def __call__(self) -> RequestHandler:
        full = self.open_connections + self._pending >= self.max_connections
        if full and not self._close_oldest_idle():
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:
                logger.warning(
                    "%d connections open, all busy: new ones refused (%d so far)",
                    self.open_connections,
                    self.refused,
                )
            return _Refusal()  # type: ignore[return-value]
        self._pending += 1
        return super().__call__()

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        self._pending = max(self._pending - 1, 0)
        self.open_connections += 1
        super().connection_made(handler, transport)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        self.open_connections = max(self.open_connections - 1, 0)
        super().connection_lost(handler, exc)

    def _close_oldest_idle(self) -> bool:
        for handler in self.connections:  # oldest first
            if between_requests(handler) and handler.transport is not None:
                handler.force_close()
                self.closed_idle += 1
                return True
        return False


class CappedAppRunner(RemadeServerRunner):
    """An AppRunner whose server is a `CappedServer`."""

    def __init__(self, app: web.Application, *, max_connections: int, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._max_connections = max_connections

    def remake_server(self, server: web.Server) -> web.Server:
        return remake_server(server, CappedServer, max_connections=self._max_connections)
