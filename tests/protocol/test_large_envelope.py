"""Bodies over `LARGE_BODY` (uploads) are parsed by the standard library, to the same result
and the same refusals as orjson gives a small body."""

from __future__ import annotations

import orjson
import pytest

from pyworker.protocol.envelope import LARGE_BODY, EnvelopeError, parse_envelope

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
