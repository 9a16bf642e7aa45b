"""The payload's bytes exactly as the client sent them, to forward to the model server.

Parsing and writing the payload again would change it: orjson reads an integer beyond 64 bits
as a float, and writes numbers, escapes and spacing its own way. So the worker forwards the
payload's own slice of the request body. Finding that slice costs about one more parse of the
payload in the usual cases: the payload as orjson writes it (what compact clients send) is
looked up right after a `"payload":` key; else, when the payload is the body's last member
(as the vastai client and most others send it, spaced or pretty-printed), the text from that
key to the closing brace is taken if it parses to the same payload. Only when neither holds
is the body's top level walked with the standard library's C scanner, which reports where
each value ends.

A payload nested deeper than orjson can write (`MAX_DEPTH`) is refused by the caller with 422:
such a payload could not go through a request hook, a session or a log line either.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

import orjson

MAX_DEPTH: Final = 254
"""Levels of nesting a payload may have: the most orjson can write back."""
PAYLOAD_KEY = re.compile(rb'"payload"[ \t\r\n]*:[ \t\r\n]*')
"""A `payload` key and its colon; the value starts where the match ends."""
SPACES = frozenset((b" ", b"\t", b"\r", b"\n"))
LOOKUPS = 4
"""`"payload"` keys tried before walking the body instead."""
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
    found = _payload_member(body, payload, compact)
    return found if found is not None else _scanned_payload(body)


def _payload_member(body: bytes, payload: dict[str, Any], compact: bytes) -> bytes | None:
    """The value after a `"payload":` key, when it is cheap to prove it is the payload.

    It is when it starts with the payload as orjson writes it (a whole JSON object ends where
    its text does), or when the text from there to the body's closing brace parses to the
    payload (a slice that parses is one whole value; duplicate keys: orjson keeps the last).
    """
    position = 0
    for _ in range(LOOKUPS):
        key = PAYLOAD_KEY.search(body, position)
        if key is None:
            return None
        start = position = key.end()
        if body.startswith(compact, start):
            return compact
        end = _skip_back(body, _skip_back(body, len(body)) - 1)  # before the closing brace
        if start >= end or body[start : start + 1] != b"{":
            continue
        view = memoryview(body)[start:end]
        try:
            if orjson.loads(view) == payload:
                return bytes(view)
        except orjson.JSONDecodeError:
            continue
    return None


def _skip_back(body: bytes, end: int) -> int:
    """The end of `body[:end]` without its trailing whitespace."""
    while end > 0 and body[end - 1 : end] in SPACES:
        end -= 1
    return end


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
