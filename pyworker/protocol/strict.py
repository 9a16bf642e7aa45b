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

import base64
import binascii
import dataclasses
import hashlib
import heapq
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from pyworker.protocol.auth import AuthData, Verdict, same_worker

SCHEME_VERSION = 1
"""The `sig_v` this worker verifies; it is part of the signed message."""
DEFAULT_SKEW = 30.0
"""Seconds of clock difference between autoscaler and worker that are forgiven."""
DEFAULT_MAX_LIFETIME = 300.0
"""How far ahead `expires` may lie; it also bounds how long a replay entry is kept."""
DEFAULT_REPLAY_CAPACITY = 100_000
MAX_SIGNATURE_TEXT = 2048
"""base64 characters; an RSA-8192 signature takes 1368."""
MAX_SAFE_INTEGER = 2**53 - 1
"""Beyond it a JSON number is not exact in every language, so it cannot be signed portably."""

PublicKey = rsa.RSAPublicKey | ed25519.Ed25519PublicKey
PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


class CanonicalError(ValueError):
    """A value that has no canonical JSON form (not finite, unsafe integer, lone surrogate)."""


# --- the canonical message ------------------------------------------------------------------


def canonical_number(value: int | float) -> str:
    """A number as RFC 8785 writes it (ECMAScript's Number.prototype.toString)."""
    if isinstance(value, bool):
        raise CanonicalError("a boolean is not a number")
    if isinstance(value, int):
        if abs(value) > MAX_SAFE_INTEGER:
            raise CanonicalError(f"integer {value} is beyond 2**53 - 1")
        return str(value)
    if not math.isfinite(value):
        raise CanonicalError(f"{value} has no JSON form")
    if value == 0:
        return "0"  # -0 too
    sign = "-" if value < 0 else ""
    # repr() gives the shortest digits that round-trip, as ECMAScript requires.
    _, digit_tuple, exponent = Decimal(repr(abs(value))).as_tuple()
    assert isinstance(exponent, int)
    digits = "".join(map(str, digit_tuple)).rstrip("0")
    exponent += len(digit_tuple) - len(digits)
    count = len(digits)
    point = exponent + count  # the decimal point sits after this many digits
    if count <= point <= 21:
        text = digits + "0" * (point - count)
    elif 0 < point <= 21:
        text = f"{digits[:point]}.{digits[point:]}"
    elif -6 < point <= 0:
        text = "0." + "0" * -point + digits
    else:
        power = point - 1
        mantissa = digits if count == 1 else f"{digits[0]}.{digits[1:]}"
        text = f"{mantissa}e{'+' if power >= 0 else '-'}{abs(power)}"
    return sign + text


def canonical_string(value: str) -> str:
    """A string as RFC 8785 writes it: UTF-8, only `"`, `\\` and controls escaped."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise CanonicalError("string holds a lone surrogate") from None
    return json.dumps(value, ensure_ascii=False)


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
    members = []
    for name in sorted(SIGNED_FIELDS):
        value = getattr(request, name)
        text = canonical_string(value) if isinstance(value, str) else canonical_number(value)
        members.append(f'"{name}":{text}')
    return ("{" + ",".join(members) + "}").encode("utf-8")


def message_for(auth: AuthData) -> bytes:
    """The canonical message of a received auth_data; CanonicalError if it has none."""
    if auth.expires is None or auth.sig_v is None:
        raise CanonicalError("auth_data has no expires or sig_v")
    return canonical_message(SignedRequest.from_fields(vars(auth)))


# --- keys and signatures --------------------------------------------------------------------


def load_public_key(pem: bytes) -> PublicKey:
    """An RSA or Ed25519 public key from PEM; ValueError for anything else."""
    try:
        key = serialization.load_pem_public_key(pem)
    except UnsupportedAlgorithm as error:
        raise ValueError(f"unsupported public key: {error}") from None
    if not isinstance(key, rsa.RSAPublicKey | ed25519.Ed25519PublicKey):
        raise ValueError("the autoscaler's public key is neither RSA nor Ed25519")
    return key


def sign_message(key: PrivateKey, message: bytes) -> str:
    """base64 of the signature: RSA PKCS#1 v1.5 over SHA-256, or Ed25519."""
    if isinstance(key, rsa.RSAPrivateKey):
        raw = key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    else:
        raw = key.sign(message)
    return base64.b64encode(raw).decode()


def verify_message(key: PublicKey, message: bytes, signature: str) -> bool:
    if len(signature) > MAX_SIGNATURE_TEXT:
        return False
    try:
        raw = base64.b64decode(signature, validate=True)
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(raw, message, padding.PKCS1v15(), hashes.SHA256())
        else:
            key.verify(raw, message)
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True


def strict_fields(key: PrivateKey, request: SignedRequest) -> dict[str, Any]:
    """What an autoscaler adds to its `/route/` answer to make it strict."""
    return {
        "expires": request.expires,
        "sig_v": request.sig_v,
        "strict_signature": sign_message(key, canonical_message(request)),
    }


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
