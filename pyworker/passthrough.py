"""The payload's bytes exactly as the client sent them, to forward to the model server.

Parsing and writing the payload again would change it: orjson reads an integer beyond 64 bits
as a float, and writes numbers, escapes and spacing its own way. So the worker forwards the
payload's own slice of the request body. Finding that slice costs almost nothing in the usual
case: the payload written back by orjson (what compact clients send) or by Python's `json`
(what `requests` and `aiohttp` send) is looked up in the body, right after a `"payload":`
key. Only when neither is there (pretty-printed bodies, integers beyond 64 bits, other
spellings) is the body's top level walked with the standard library's C scanner, which
reports where each value ends.

A payload nested deeper than orjson can write (`MAX_DEPTH`) is refused by the caller with 422:
such a payload could not go through a request hook, a session or a log line either.
"""

from __future__ import annotations

import json
from typing import Any, Final

import orjson

MAX_DEPTH: Final = 254
"""Levels of nesting a payload may have: the most orjson can write back."""
PAYLOAD_KEY = b'"payload"'
WHITESPACE = b" \t\r\n"
LOOKUPS = 4
"""Places where an encoding of the payload is tried before walking the body instead."""
_DECODER = json.JSONDecoder()
_scan_string = json.decoder.scanstring  # type: ignore[attr-defined]  # C, in every CPython


class TooDeep(ValueError):
    """The value nests deeper than `MAX_DEPTH` levels."""


def encodable(value: Any) -> bytes:
    """`value` written by orjson; TooDeep when it nests too deeply to be written."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        raise TooDeep(f"must not nest more than {MAX_DEPTH} levels deep") from None


def payload_bytes(body: bytes, payload: dict[str, Any]) -> bytes:
    """The bytes of the `payload` member of the JSON object `body`, as the client wrote them.

    `payload` is that member as orjson parsed it (the last one, if the key repeats); `body` is
    known to be valid JSON. TooDeep if the payload nests more than `MAX_DEPTH` levels.
    """
    compact = encodable(payload)
    if _is_payload_member(body, compact):
        return compact
    python_style = json.dumps(payload).encode()
    if _is_payload_member(body, python_style):
        return python_style
    return _scanned_payload(body)


def _is_payload_member(body: bytes, encoded: bytes) -> bool:
    """Whether `encoded` appears in `body` as the value of a `"payload"` key."""
    start = body.find(encoded)
    for _ in range(LOOKUPS):
        if start < 0:
            return False
        before = body[max(0, start - 64) : start].rstrip(WHITESPACE)
        if before.endswith(b":") and before[:-1].rstrip(WHITESPACE).endswith(PAYLOAD_KEY):
            return True
        start = body.find(encoded, start + 1)
    return False


def _scanned_payload(body: bytes) -> bytes:
    """The last top-level `payload` value's slice, found with the standard library's scanner."""
    text = body.decode("utf-8")
    span: tuple[int, int] | None = None
    position = _skip_space(text, 0)
    if not text.startswith("{", position):
        raise ValueError("the body is not a JSON object")
    position = _skip_space(text, position + 1)
    while text.startswith('"', position):
        key, position = _scan_string(text, position + 1)
        position = _skip_space(text, position)
        position = _skip_space(text, position + 1)  # the colon
        _, end = _DECODER.raw_decode(text, position)
        if key == "payload":
            span = (position, end)
        position = _skip_space(text, end)
        if text.startswith(",", position):
            position = _skip_space(text, position + 1)
    if span is None:
        raise ValueError("the body has no payload")
    return text[span[0] : span[1]].encode("utf-8")


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position
