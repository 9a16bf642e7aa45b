"""Verifying the `auth_data` that the autoscaler's `/route/` signed.

The reference scheme signs only `{"url": ...}`: every request to one worker carries one of a
few signatures, so a bounded cache of verified (url, signature) pairs makes the common case
cost a dictionary lookup instead of an RSA operation. Strict mode (pyworker.protocol.strict)
verifies a signature per request instead; both verifiers answer the same `Verifier` protocol.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
)

from pyworker.backports import StrEnum
from pyworker.protocol import outbound
from pyworker.protocol.workload import MAX_WORKLOAD

logger = logging.getLogger(__name__)


NUMBER_FIELDS = ("cost", "reqnum", "request_idx")
MAX_INDEX = 2**63 - 1
"""The largest `request_idx` or `reqnum`: what a signed 64-bit integer, and so every report
and every JSON encoder on the way, can carry."""


class AuthData(BaseModel):
    """The autoscaler's answer to `/route/`, passed through by the client. Extra keys ignored.

    Numbers are checked here, where they enter, against what the wire protocol can carry (a
    number sent as a string is accepted, as by the reference), so nothing downstream
    (accounting, reports, /status) can fail on one. A boolean is not a number: pydantic would
    take `true` for 1, so pyworker.protocol.envelope refuses booleans in `NUMBER_FIELDS` first (one
    check there is cheaper than a Python validator per field on every request).
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    cost: float = Field(ge=0, le=MAX_WORKLOAD, allow_inf_nan=False)
    endpoint: str
    reqnum: int = Field(ge=0, le=MAX_INDEX)
    request_idx: int = Field(ge=0, le=MAX_INDEX)
    signature: str
    url: str
    # Strict mode only (pyworker.protocol.strict). A value of the wrong type is ignored like an
    # unknown key, so a reference worker's clients never get a 422 for them.
    expires: float | None = Field(default=None, allow_inf_nan=False)
    sig_v: int | None = None
    strict_signature: str | None = None

    @field_validator("expires", "sig_v", "strict_signature", mode="wrap")
    @classmethod
    def _ignore_invalid(cls, value: object, handler: ValidatorFunctionWrapHandler) -> object:
        try:
            return handler(value)
        except ValidationError:
            return None


class Verdict(StrEnum):
    """What a verifier concluded about one auth_data; the value is what a client is told."""

    ACCEPTED = "accepted"
    INVALID = "invalid signature"
    UNSIGNED = "strict signature required: auth_data lacks expires, sig_v or strict_signature"
    UNSUPPORTED = "unsupported sig_v"
    WRONG_WORKER = "auth_data was signed for another worker"
    EXPIRED = "auth_data expired"
    TOO_LONG = "auth_data expires too far ahead"
    REPLAYED = "auth_data already used"
    BUSY = "too many auth_data in flight to remember: retry"
    """Only this one is not the client's fault (503, not 401)."""


class Verifier(Protocol):
    """A signature check the worker's routes can use; the key arrives later, from /pubkey/."""

    @property
    def has_key(self) -> bool: ...

    def load_pem(self, pem: bytes) -> None: ...

    def check(self, auth: AuthData) -> Verdict: ...


def reference_message(url: str) -> bytes:
    """The exact bytes the reference autoscaler signs: `{"url": url}`, 4-space indent, sorted."""
    return json.dumps({"url": url}, indent=4, sort_keys=True).encode()


DEFAULT_PORTS = {"http": 80, "https": 443}
MAX_URL = 2048
"""Characters of a url that `worker_address` reads; a longer one names no worker. The url is
read before its signature is checked: this bounds what the caches below keep of a client's."""
ADDRESS_CACHE = 256


def worker_address(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an http(s) url, lower-cased, the port defaulted; None if unusable.

    A path, query or fragment after them is ignored: some clients sign a url with a path.
    A url over MAX_URL characters is unusable, before any cache sees it.
    """
    return None if len(url) > MAX_URL else _cached_address(url)


@functools.lru_cache(maxsize=ADDRESS_CACHE)
def _cached_address(url: str) -> tuple[str, str, int] | None:
    """Cached: every request of a fleet carries the same few urls, and this is on the request
    path. It and the standard library's own cache of `urlsplit` keep at most a few hundred
    urls of MAX_URL characters each (about 1 MB, whatever clients send)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if scheme not in DEFAULT_PORTS or not host:
        return None
    return scheme, host, port if port is not None else DEFAULT_PORTS[scheme]


def same_worker(given: str, own: str) -> bool:
    """Whether `given` names the worker at `own`: same scheme, host and port."""
    address = worker_address(given)
    return address is not None and address == worker_address(own)


MAX_CACHED_PAIR = 4096
"""Characters of a verified (url, signature) pair the verifier keeps: its cache is bounded in
bytes (4096 pairs of at most this), not only in entries. A 2048-bit signature is 344."""


class SignatureVerifier:
    """RSA PKCS#1 v1.5 / SHA-256 checks of the reference message; successes kept in an LRU.

    Only verified pairs are kept: nothing a client sends before its signature is checked
    stays in memory.

    `audience` returns this worker's public url: a signature for another worker's url is
    refused (`Verdict.WRONG_WORKER`), so one worker's auth_data cannot be spent on another.
    None accepts any url (PYWORKER_VERIFY_URL=false, behind a proxy that rewrites it).
    """

    def __init__(self, cache_size: int = 4096, audience: Callable[[], str] | None = None) -> None:
        self.audience = audience
        self._key: rsa.RSAPublicKey | None = None
        self._cache: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._cache_size = cache_size

    def __len__(self) -> int:
        """Verified (url, signature) pairs kept."""
        return len(self._cache)

    @property
    def has_key(self) -> bool:
        return self._key is not None

    def load_pem(self, pem: bytes) -> None:
        try:
            key = serialization.load_pem_public_key(pem)
        except UnsupportedAlgorithm as error:
            raise ValueError(f"unsupported public key: {error}") from None
        if not isinstance(key, rsa.RSAPublicKey):
            raise ValueError("the autoscaler's public key is not an RSA key")
        self._key = key
        self._cache.clear()

    def check(self, auth: AuthData) -> Verdict:
        if self.audience is not None and not same_worker(auth.url, self.audience()):
            return Verdict.WRONG_WORKER
        return Verdict.ACCEPTED if self._signed(auth) else Verdict.INVALID

    def _signed(self, auth: AuthData) -> bool:
        if self._key is None:
            return False
        pair = (auth.url, auth.signature)
        if pair in self._cache:
            self._cache.move_to_end(pair)
            return True
        try:
            signature = base64.b64decode(auth.signature, validate=True)
            self._key.verify(
                signature, reference_message(auth.url), padding.PKCS1v15(), hashes.SHA256()
            )
        except (InvalidSignature, binascii.Error, ValueError):
            return False
        if len(auth.url) + len(auth.signature) > MAX_CACHED_PAIR:
            return True  # signed, but too large to keep: checked again next time
        self._cache[pair] = None
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return True


PUBKEY_PATH = "/pubkey/"
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
    (pyworker.protocol.outbound: no redirect, a bounded answer); after a round that found none,
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
