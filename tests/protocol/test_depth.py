"""Naming the member of a body that nests too deeply, even where no parser here can read it."""

from __future__ import annotations

import pytest

from pyworker.protocol.depth import MAX_NAME, TOO_DEEP, deep_members, member_past_depth
from pyworker.protocol.passthrough import MAX_DEPTH


def deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 1100, 5000])
def test_the_first_member_past_the_limit_is_named(depth: int) -> None:
    body = b'{"a": [[1]], "b\\u00e9\\"": %s, "c": %s}' % (deep(depth), deep(depth))
    assert member_past_depth(body) == {'b\u00e9"': TOO_DEEP}


def test_brackets_inside_strings_do_not_count() -> None:
    text = b'"' + b"[{" * 3000 + b'\\" ]"'
    assert member_past_depth(b'{"s": %s, "k": %s}' % (text, deep(MAX_DEPTH))) is None
    assert member_past_depth(b'{"s": %s, "k": %s}' % (text, deep(MAX_DEPTH + 1))) == {"k": TOO_DEEP}


def test_no_member_to_name_is_none() -> None:
    assert member_past_depth(deep(5000)) is None  # no object: "not valid JSON" stays the answer
    assert member_past_depth(b'{"a": 1, "b": [}') is None  # bad JSON, not deep
    assert member_past_depth(b"") is None


def test_a_long_name_is_shortened() -> None:
    name = "n" * 10_000
    named = member_past_depth(b'{"%s": %s}' % (name.encode(), deep(MAX_DEPTH + 1)))
    assert named == {name[:MAX_NAME] + "...": TOO_DEEP}


def test_deep_members_of_a_parsed_document() -> None:
    value: object = 1
    for _ in range(MAX_DEPTH + 1):
        value = [value]
    document = {"payload": value, "session_id": value, "ok": [[1]], "s": "x"}
    assert deep_members(document, skip="payload") == {"session_id": TOO_DEEP}
    assert deep_members(document) == {"payload": TOO_DEEP, "session_id": TOO_DEEP}
