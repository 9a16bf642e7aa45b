"""How a call to the model server fails: the upstream layer's one error contract.

Whatever goes wrong in a call through `ModelClient` (pyworker.upstream.model), the socket, the
answer's bytes, a timeout, a custom handler's aiohttp session or a route's function, reaches
the caller as one of the `UpstreamError`s below: its class says which part failed (for callers
that must tell them apart, as the benchmark tells a refused connection from a dropped one), its
`status` and `message` are what the client is told. Nothing above this package sees the pool's,
the connection's or aiohttp's exceptions, nor the timeout of a call.

The connection raises these errors itself; a foreign exception becomes one here and nowhere
else: `connect_errors` where a socket is opened, `model_errors` around every other call the
facade makes. What a template's own code raises goes through as it is: a handler's bug, and
what a function's streamed chunks raise (pyworker.upstream.functions).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import aiohttp


class UpstreamError(Exception):
    """The model server gave no whole answer; the client gets `status` and `message`."""

    status: int = 502
    summary = "model server failed"
    """The message's start; a detail, if any, follows it."""

    def __init__(self, detail: str | None = None) -> None:
        message = self.summary if detail is None else f"{self.summary}: {detail}"
        super().__init__(message)
        self.message = message


class ConnectFailed(UpstreamError):
    """No connection: refused, unreachable, or the name does not resolve."""

    summary = "model server unreachable"


class ConnectTimedOut(UpstreamError):
    """The connection was not made within the connect timeout."""

    summary = "model server unreachable: connect timed out"


class ReadTimedOut(UpstreamError):
    """No answer, or nothing more of it, within the time it was given."""

    status = 504
    summary = "model server timed out"


class Disconnected(UpstreamError):
    """The connection closed before the answer was whole (by the model server, or by the
    worker's own close)."""


class BadAnswer(UpstreamError):
    """What came back is not an answer that can be relayed: bytes that are not HTTP/1.x, a
    framing that could smuggle another answer, or an error of a handler's aiohttp session."""


class FunctionFailed(UpstreamError):
    """A route's function raised, timed out, or returned something that cannot be sent;
    `status` says which (422, 500, 504)."""

    def __init__(self, status: int, message: str) -> None:
        Exception.__init__(self, message)
        self.status = status
        self.message = message


@contextlib.contextmanager
def connect_errors() -> Iterator[None]:
    """Opening a socket: the connect timeout or an OSError becomes `ConnectTimedOut` or
    `ConnectFailed`."""
    try:
        yield
    except (TimeoutError, asyncio.TimeoutError):
        raise ConnectTimedOut from None
    except OSError as error:
        raise ConnectFailed(error.strerror or str(error)) from None


@contextlib.contextmanager
def model_errors() -> Iterator[None]:
    """A call of the facade: its timeout, and aiohttp's errors (a custom handler's session),
    become the `UpstreamError` that says what failed; upstream's own go through."""
    try:
        yield
    except UpstreamError:
        raise
    except aiohttp.ConnectionTimeoutError:
        raise ConnectTimedOut from None
    except aiohttp.ClientConnectorError as error:
        raise ConnectFailed(str(error.os_error)) from None
    except (TimeoutError, asyncio.TimeoutError):
        raise ReadTimedOut from None
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as error:
        raise Disconnected(error.__class__.__name__) from None
    except aiohttp.ClientError as error:
        raise BadAnswer(error.__class__.__name__) from None
