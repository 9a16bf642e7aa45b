"""Fetching the autoscaler's public key from `/pubkey/`, which the signature checks need.

The verifiers (pyworker.protocol.auth, pyworker.protocol.strict) only load the PEM; this is
the network side: each `REPORT_ADDR` entry in turn, as reports fail over, through
pyworker.lifecycle.outbound (no redirect, a bounded answer). Readiness waits on `KeyFetch`
and reports its problem.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

import aiohttp

from pyworker.lifecycle import outbound
from pyworker.protocol.auth import Verifier
from pyworker.protocol.messages import PUBKEY_PATH

# Its lines keep the logger name they had when the fetch lived beside the verifier: the
# log a worker writes at INFO is part of what operators read and grep.
logger = logging.getLogger("pyworker.protocol.auth")

KEY_ATTEMPT_TIMEOUT = 5.0
KEY_FIRST_DELAY = 0.5
KEY_MAX_DELAY = 30.0
"""Rounds over REPORT_ADDR are 0.5 s apart at first, doubling up to 30 s."""
MAX_KEY_PROBLEM = 500
"""Characters of `KeyFetch.problem`: it becomes the report's `error_msg`."""


class KeyFetch:
    """How fetching the public key goes: readiness waits on it, and reports its problem."""

    def __init__(self) -> None:
        self.loaded = asyncio.Event()
        self.failed = asyncio.Event()
        """Set once a whole round over the addresses failed (and never cleared)."""
        self.problem = ""
        """What the last failed round met at each address."""


async def fetch_public_key(
    session: aiohttp.ClientSession,
    addresses: Sequence[str],
    verifier: Verifier,
    fetch: KeyFetch | None = None,
    *,
    first_delay: float | None = None,
) -> None:
    """Fetch `/pubkey/` from each address in turn until one loads, as reports fail over
    (pyworker.lifecycle.outbound: no redirect, a bounded answer); after a round that found none,
    say why in `fetch` and back off exponentially."""
    fetch = fetch or KeyFetch()
    delay = KEY_FIRST_DELAY if first_delay is None else first_delay
    while True:
        problems: list[str] = []
        replies = outbound.attempts(
            session, addresses, PUBKEY_PATH, method="GET", timeout=KEY_ATTEMPT_TIMEOUT
        )
        async with contextlib.aclosing(replies):
            async for reply in replies:
                problem = _load_key(reply, verifier)
                if not problem:
                    logger.info("public key loaded from %s", reply.url)
                    fetch.loaded.set()
                    return
                logger.warning("public key from %s: %s", reply.url, problem)
                problems.append(f"{reply.url}: {problem}")
        fetch.problem = "; ".join(problems)[:MAX_KEY_PROBLEM]
        fetch.failed.set()
        await asyncio.sleep(delay)
        delay = min(delay * 2, KEY_MAX_DELAY)


def _load_key(reply: outbound.Reply, verifier: Verifier) -> str:
    """Why `reply` gave no key; "" once the verifier loaded it."""
    if reply.status != 200:
        return reply.problem or f"HTTP {reply.status}"
    if reply.truncated:
        return f"the answer is over {outbound.MAX_ANSWER} bytes"
    try:
        verifier.load_pem(reply.body)
    except ValueError as error:
        return str(error)[:200]
    return ""
