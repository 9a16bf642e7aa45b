"""Verifying the `auth_data` that the autoscaler's `/route/` signed.

The reference scheme signs only `{"url": ...}`: every request to one worker carries one of a
few signatures, so a bounded cache of verified (url, signature) pairs makes the common case
cost a dictionary lookup instead of an RSA operation. Strict mode (pyworker.protocol.strict)
verifies a signature per request instead; both verifiers answer the same `Verifier` protocol.
"""

from __future__ import annotations

import functools
import json
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
)

from pyworker.backports import StrEnum
from pyworker.protocol.keys import PublicKey, load_public_key, verify_message
from pyworker.protocol.workload import MAX_WORKLOAD

NUMBER_FIELDS = ("cost", "reqnum", "request_idx")
STRICT_FIELDS = ("expires", "sig_v", "strict_signature")
"""What strict mode adds to auth_data (pyworker.protocol.strict), in this order."""
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

    @field_validator(*STRICT_FIELDS, mode="wrap")
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
    """A signature check the worker's routes can use; the key arrives later, from the
    autoscaler's `PUBKEY_PATH` (pyworker.lifecycle.public_key)."""

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
        self._key: PublicKey | None = None
        self._cache: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._cache_size = cache_size

    def __len__(self) -> int:
        """Verified (url, signature) pairs kept."""
        return len(self._cache)

    @property
    def has_key(self) -> bool:
        return self._key is not None

    def load_pem(self, pem: bytes) -> None:
        self._key = load_public_key(pem, ed25519_too=False)
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
        if not verify_message(self._key, reference_message(auth.url), auth.signature):
            return False
        if len(auth.url) + len(auth.signature) > MAX_CACHED_PAIR:
            return True  # signed, but too large to keep: checked again next time
        self._cache[pair] = None
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return True
