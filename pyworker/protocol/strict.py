"""Strict auth_data signatures: one signed message per request, bound to what the request is.

The reference signature covers only the worker's url, so one captured auth_data authorizes any
number of requests, at any cost, forever. In strict mode the autoscaler signs a canonical
message that binds `url`, `endpoint`, `request_idx`, `reqnum`, `cost` and an expiry, and the
worker accepts it once: it checks the signature (RSA PKCS#1 v1.5 / SHA-256, or Ed25519), that
the url is its own, that the message has not expired (with a small clock-skew allowance), and
that it has not seen the message before (a replay cache bounded in size and pruned by expiry).

The canonical message is the JSON Canonicalization Scheme (RFC 8785) of exactly these fields:

    {"cost":10,"endpoint":"e","expires":1700000060,"reqnum":3,"request_idx":7,"sig_v":1,
     "url":"http://1.2.3.4:5000"}

docs/security.md describes the scheme for autoscaler authors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pyworker.protocol.auth import STRICT_FIELDS, AuthData, Verdict, same_worker
from pyworker.protocol.canonical import CanonicalError, canonical_json
from pyworker.protocol.keys import PrivateKey, PublicKey, load_public_key, sign_message
from pyworker.protocol.keys import verify_message as verify_signature

SCHEME_VERSION = 1
"""The `sig_v` this worker verifies; it is part of the signed message."""
DEFAULT_SKEW = 30.0
"""Seconds of clock difference between autoscaler and worker that are forgiven."""
DEFAULT_MAX_LIFETIME = 300.0
"""How far ahead `expires` may lie; it also bounds how long a replay entry is kept."""
DEFAULT_REPLAY_CAPACITY = 100_000
MAX_SIGNATURE_TEXT = 2048
"""base64 characters; an RSA-8192 signature takes 1368."""


# --- the canonical message ------------------------------------------------------------------


@dataclass(frozen=True)
class SignedRequest:
    """What a strict signature binds: exactly the fields of the canonical message."""

    url: str
    endpoint: str
    request_idx: int
    reqnum: int
    cost: float
    expires: float
    sig_v: int = SCHEME_VERSION

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> SignedRequest:
        """The signed fields of a `/route/` answer (or auth_data); the rest is left out."""
        return cls(**{name: fields[name] for name in SIGNED_FIELDS if name in fields})


SIGNED_FIELDS = tuple(field.name for field in dataclasses.fields(SignedRequest))


def canonical_message(request: SignedRequest) -> bytes:
    """The exact bytes an autoscaler signs in strict mode (RFC 8785 of exactly these fields)."""
    return canonical_json({name: getattr(request, name) for name in SIGNED_FIELDS}).encode()


def message_for(auth: AuthData) -> bytes:
    """The canonical message of a received auth_data; CanonicalError if it has none."""
    if auth.expires is None or auth.sig_v is None:
        raise CanonicalError("auth_data has no expires or sig_v")
    return canonical_message(SignedRequest.from_fields(vars(auth)))


# --- signatures -----------------------------------------------------------------------------


def verify_message(key: PublicKey, message: bytes, signature: str) -> bool:
    """Whether `signature` is `key`'s over `message`; a text longer than any key signs is not."""
    return len(signature) <= MAX_SIGNATURE_TEXT and verify_signature(key, message, signature)


def strict_fields(key: PrivateKey, request: SignedRequest) -> dict[str, Any]:
    """What an autoscaler adds to its `/route/` answer to make it strict."""
    signature = sign_message(key, canonical_message(request))
    return dict(zip(STRICT_FIELDS, (request.expires, request.sig_v, signature), strict=True))


# --- the replay cache -----------------------------------------------------------------------


class ReplayCache:
    """Digests of messages already accepted, each kept until it would be refused as expired.

    Bounded by `capacity`: once full of unexpired entries it refuses new ones (the caller
    answers 503) rather than forget one and let it be replayed.
    """

    def __init__(self, capacity: int = DEFAULT_REPLAY_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._until: dict[bytes, float] = {}
        self._by_expiry: list[tuple[float, bytes]] = []

    def __len__(self) -> int:
        return len(self._until)

    def __contains__(self, digest: object) -> bool:
        return digest in self._until

    def prune(self, now: float) -> None:
        """Forget every entry whose message would now be refused as expired anyway."""
        heap = self._by_expiry
        while heap and heap[0][0] < now:
            _, digest = heapq.heappop(heap)
            del self._until[digest]

    def add(self, digest: bytes, keep_until: float, now: float) -> bool:
        """Remember `digest` until `keep_until`; False when full of unexpired entries.

        Expired entries go first, so the cache holds only what may still be replayed.
        """
        self.prune(now)
        if len(self._until) >= self.capacity:
            return False
        self._until[digest] = keep_until
        heapq.heappush(self._by_expiry, (keep_until, digest))
        return True


# --- the verifier ---------------------------------------------------------------------------


class StrictVerifier:
    """Checks strict auth_data; each signed message is accepted at most once.

    `audience` returns this worker's public url: auth_data signed for another worker is
    refused. None skips that check (a verifier that serves no particular worker).
    """

    def __init__(
        self,
        audience: Callable[[], str] | None = None,
        *,
        skew: float = DEFAULT_SKEW,
        max_lifetime: float = DEFAULT_MAX_LIFETIME,
        replay_capacity: int = DEFAULT_REPLAY_CAPACITY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.audience = audience
        self.skew = skew
        self.max_lifetime = max_lifetime
        self.clock = clock
        self.replays = ReplayCache(replay_capacity)
        self._key: PublicKey | None = None

    @property
    def has_key(self) -> bool:
        return self._key is not None

    def load_pem(self, pem: bytes) -> None:
        self._key = load_public_key(pem)

    def check(self, auth: AuthData) -> Verdict:
        """Accept `auth` (and remember it), or say why not. Cheap checks come first."""
        if self._key is None:
            return Verdict.INVALID
        if auth.sig_v is None or auth.expires is None or auth.strict_signature is None:
            return Verdict.UNSIGNED
        if auth.sig_v != SCHEME_VERSION:
            return Verdict.UNSUPPORTED
        if self.audience is not None and not same_worker(auth.url, self.audience()):
            return Verdict.WRONG_WORKER
        now = self.clock()
        if auth.expires + self.skew < now:
            return Verdict.EXPIRED
        if auth.expires > now + self.max_lifetime + self.skew:
            return Verdict.TOO_LONG
        try:
            message = message_for(auth)
        except CanonicalError:
            return Verdict.INVALID
        digest = hashlib.sha256(message).digest()
        if digest in self.replays:
            return Verdict.REPLAYED
        if not verify_message(self._key, message, auth.strict_signature):
            return Verdict.INVALID
        if not self.replays.add(digest, auth.expires + self.skew, now):
            return Verdict.BUSY
        return Verdict.ACCEPTED
