"""Reading request bodies before their signature is checked, within a bound for all clients.

Anyone can send a body; only a signed one is worth memory. Each body's bytes are counted, as
they arrive, against one budget shared by every request whose signature is not yet checked
(`UnverifiedBytes`). A body that does not fit is refused (`503` with `Retry-After`) at once (a
declared length) or as soon as it passes the budget (a streamed one), so sixteen 30 MB bodies
with bad signatures hold at most the budget, not 480 MB. The bytes are given back as soon as
the body is parsed (before the signature check), and after large bodies the freed memory is
returned to the system (pyworker.serving.memory).

A compressed body (`Content-Encoding: gzip`, `deflate`, `br`, `zstd`) is measured by its decoded
size as it is decoded: aiohttp (>= 3.13.3) inflates it in bounded steps as it is read, and
reading stops at the size limit (413), so a small gzip bomb is never inflated whole.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from aiohttp import web

from pyworker.serving import refusals
from pyworker.serving.memory import Trimmer

T = TypeVar("T")
LARGE_BODY = 1024 * 1024
"""Releasing a body this large schedules a trim (pyworker.serving.memory)."""


class UnverifiedBytes:
    """The bytes held by request bodies whose signature is not checked yet, within `limit`."""

    def __init__(self, limit: int, trimmer: Trimmer | None = None) -> None:
        self.limit = limit
        self.held = 0
        self.refused = 0
        """Bodies answered 503 because the budget was spent."""
        self.trimmer = trimmer or Trimmer()

    def take(self, size: int) -> bool:
        if self.held + size > self.limit:
            return False
        self.held += size
        return True

    def give_back(self, size: int) -> None:
        self.held = max(self.held - size, 0)
        if size >= LARGE_BODY:
            self.trimmer.trim_soon()

    async def read(self, request: web.Request, max_size: int, parse: Callable[[bytes], T]) -> T:
        """`parse` of the body (decoded), its bytes held in the budget until `parse` returns.

        Raises `Refused` over `max_size` (declared, streamed or decoded), and when the budget
        cannot hold it now. What `parse` raises passes through.
        """
        declared = request.content_length
        if declared is not None and declared > max_size:
            raise refusals.body_too_large(max_size)
        if declared and not self.take(declared):
            raise self._busy()
        held = declared or 0
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > max_size:
                    raise refusals.body_too_large(max_size)
                if size > held:
                    if not self.take(size - held):
                        raise self._busy()
                    held = size
                chunks.append(chunk)
            return parse(b"".join(chunks))
        finally:
            chunks.clear()  # parsing does not wait: the budget is free again as it returns
            self.give_back(held)

    def _busy(self) -> refusals.Refused:
        self.refused += 1
        return refusals.unverified_budget_spent()
