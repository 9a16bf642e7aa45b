"""How a call to the model server fails, and what the client is told when it does.

The connection pool raises `PoolError`s (which part failed: connect, read, the bytes); a custom
route handler raises aiohttp's client errors. `model_errors` turns either into the one
`UpstreamError` whose status (502 or 504) and message the worker answers with.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import aiohttp


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


class UpstreamError(Exception):
    """The model server could not give an answer; `status` is what the client gets."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


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
