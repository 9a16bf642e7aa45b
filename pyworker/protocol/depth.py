"""How deeply the members of a request body nest, named member by member.

Every value of a body is written back by orjson at some point (a hook's payload, a session's
auth_data in `/session/get`, a log line), compared (a session's auth_data), or walked (the
payload's own bytes, pyworker.protocol.passthrough): each of those fails, or recurses past
Python's limit, on a value nested deeper than `MAX_DEPTH`. So every member is checked as it
enters, and the 422 names it: `{"session_id": "must not nest more than 254 levels deep"}`.

A body nested deeper than the parsers read at all (orjson stops at 1024 levels, the standard
parser at the recursion limit) is still answered by member: its brackets are counted, outside
strings, up to the first member that goes past `MAX_DEPTH`.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pyworker.protocol.passthrough import MAX_DEPTH, TooDeep, encodable

TOO_DEEP = f"must not nest more than {MAX_DEPTH} levels deep"
MAX_NAME = 100
"""Characters of a member's name repeated in a 422."""
TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"(?P<colon>[ \t\r\n]*:)?|[\[\]{}]')
"""A string (with the colon after it, when it is a key) or a bracket."""
OPENING = frozenset(b"[{")


def deep_members(document: dict[str, Any], skip: str = "") -> dict[str, str]:
    """The members of `document` (but `skip`) nested deeper than MAX_DEPTH, each with why."""
    found: dict[str, str] = {}
    for name, value in document.items():
        if name != skip and isinstance(value, dict | list):
            try:
                encodable(value)
            except TooDeep as error:
                found[_shown(name)] = str(error)
    return found


def member_past_depth(body: bytes) -> dict[str, str] | None:
    """`{name: TOO_DEEP}` for the first top-level member of the JSON object `body` that nests
    past MAX_DEPTH; None when `body` is no object or none does (it fails for another reason).

    Linear in the body, and only run on a body a parser gave up on.
    """
    depth = 0
    name: str | None = None
    for token in TOKEN.finditer(body):
        text = token.group()
        if text[0] in OPENING:
            depth += 1
            if depth > MAX_DEPTH + 1 and name is not None:
                return {_shown(name): TOO_DEEP}
        elif text[0] != ord('"'):
            depth -= 1
        elif depth == 1 and token.group("colon") is not None:
            name = _key(text[: text.rindex(b'"') + 1])
    return None


def _key(quoted: bytes) -> str:
    try:
        return str(json.loads(quoted))
    except (ValueError, RecursionError):
        return quoted[1:-1].decode("utf-8", "replace")


def _shown(name: str) -> str:
    return name if len(name) <= MAX_NAME else name[:MAX_NAME] + "..."
