"""Calls to the autoscaler's addresses (`REPORT_ADDR`), trusting nothing they answer.

Reports carry `MASTER_TOKEN`, and the public key decides which requests are served. So a call
never follows a redirect: a 3xx is a failed call and the next address is tried, so the token
goes only where the operator's list says, and another host's 200 never counts as delivered.
An answer is read up to `MAX_ANSWER` bytes, then dropped with its connection (a key is under
a kilobyte, a report's answer is ignored), and no content coding is asked for, so a small
compressed body cannot unfold into a large one. `attempts` tries each address in turn, a few
times each, yielding every try: the reporter and the public key fetch
(pyworker.lifecycle.public_key) share it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

import aiohttp

from pyworker.protocol.messages import status_problem

MAX_ANSWER = 64 * 1024
"""Bytes of an answer read; the rest is never read (the connection is closed)."""
IDENTITY = {"Accept-Encoding": "identity"}


@dataclass(frozen=True, slots=True)
class Reply:
    """What one try at one address came to."""

    url: str
    status: int | None
    """The answer's status; None when no answer came."""
    body: bytes
    """At most `MAX_ANSWER` bytes of it."""
    connected: bool
    """False when no connection was made: the call certainly did not arrive."""
    problem: str
    """Why the call failed, for a log line; "" for a 2xx."""

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def redirected(self) -> bool:
        return self.status is not None and 300 <= self.status < 400

    @property
    def truncated(self) -> bool:
        return len(self.body) > MAX_ANSWER


def session() -> aiohttp.ClientSession:
    """A session for these calls: no overall timeout (each call has its own), bodies as sent."""
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None), auto_decompress=False)


async def call(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    timeout: float,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    """One call, its answer read up to `MAX_ANSWER` + 1 bytes (one more says it was longer)."""
    try:
        async with session.request(
            method,
            url,
            data=data,
            headers={**IDENTITY, **(headers or {})},
            timeout=aiohttp.ClientTimeout(total=timeout),
            allow_redirects=False,
        ) as response:
            body = await _read_at_most(response, MAX_ANSWER + 1)
            status = response.status
    except aiohttp.ClientConnectorError as error:
        return Reply(url, None, b"", False, error.__class__.__name__)
    except (aiohttp.ClientError, asyncio.TimeoutError) as error:
        return Reply(url, None, b"", True, error.__class__.__name__ or "timeout")
    if 200 <= status < 300:
        return Reply(url, status, body, True, "")
    return Reply(url, status, body, True, status_problem(status))


async def attempts(
    session: aiohttp.ClientSession,
    addresses: Sequence[str],
    path: str,
    *,
    method: str = "POST",
    timeout: float,
    per_address: int = 1,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> AsyncGenerator[Reply, None]:
    """Each address in turn, `per_address` tries each, yielding every reply; the caller stops
    at the one it accepts (use `contextlib.aclosing`)."""
    for address in addresses:
        for _ in range(per_address):
            yield await call(
                session, method, address + path, timeout=timeout, data=data, headers=headers
            )


async def _read_at_most(response: aiohttp.ClientResponse, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_any():
        parts.append(chunk)
        size += len(chunk)
        if size >= limit:
            response.close()  # the rest is never read, and the connection never reused
            break
    return b"".join(parts)[:limit]
