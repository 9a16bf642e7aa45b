"""Bodies over `LARGE_BODY` (uploads) are parsed by the standard library, to the same result
and the same refusals as orjson gives a small body."""

from __future__ import annotations

import orjson
import pytest

from pyworker.protocol.depth import TOO_DEEP
from pyworker.protocol.envelope import LARGE_BODY, EnvelopeError, parse_envelope
from pyworker.protocol.passthrough import MAX_DEPTH

AUTH = b'{"cost": 1, "endpoint": "e", "reqnum": 1, "request_idx": 1, "signature": "", "url": ""}'


def body(value: bytes, large: bool) -> bytes:
    padding = b"A" * (LARGE_BODY + 1) if large else b"A"
    return b'{"auth_data": %s, "payload": {"pad": "%s", "value": %s}}' % (AUTH, padding, value)


@pytest.mark.parametrize(
    "value",
    [
        b'[1.5, -2, "x", null, true, {"a": []}]',
        b"123456789012345678901234567890",  # past 64 bits: a float, as orjson reads it
        b"18446744073709551615",
        b"-9223372036854775809",
        b'"\\ud83d\\ude00 \\u00e9 \\n"',
        '"caf\u00e9 \u2603"'.encode(),
    ],
)
def test_a_large_body_parses_as_a_small_one(value: bytes) -> None:
    small = parse_envelope(body(value, large=False)).payload["value"]
    large = parse_envelope(body(value, large=True)).payload["value"]
    assert large == small == orjson.loads(value)
    assert type(large) is type(small)


@pytest.mark.parametrize(
    "value", [b"NaN", b"Infinity", b"-Infinity", b"1e400", b'"\\ud800"', b'"\xff"', b"[1,]"]
)
def test_a_large_body_is_refused_where_a_small_one_is(value: bytes) -> None:
    for large in (False, True):
        with pytest.raises(EnvelopeError, match="not valid JSON"):
            parse_envelope(body(value, large))


def deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 990, 2000])
@pytest.mark.parametrize("member", ["session_id", "extra", "auth_data", "payload"])
def test_a_deep_member_is_named_in_a_large_body_as_in_a_small_one(member: str, depth: int) -> None:
    """Whichever parser read the body, and even when none could (orjson stops at 1024 levels,
    the standard one at the recursion limit), the refusal names the member."""
    for large in (False, True):
        members = {"auth_data": AUTH, "payload": b'{"pad": "%s"}' % (b"A" * (LARGE_BODY + 1))}
        if not large:
            members["payload"] = b'{"x": 1}'
        if member in members:  # deep inside it, as an extra key of its own
            members[member] = members[member][:-1] + b', "deep": ' + deep(depth) + b"}"
        else:
            members = {member: deep(depth), **members}
        written = (b'"%s": %s' % (name.encode(), value) for name, value in members.items())
        body = b"{" + b", ".join(written) + b"}"
        with pytest.raises(EnvelopeError) as refused:
            parse_envelope(body)
        assert refused.value.body() == {"error": "invalid request", member: TOO_DEEP}, large
