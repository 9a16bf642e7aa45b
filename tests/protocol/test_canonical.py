"""One canonical JSON text per value (RFC 8785): strict messages sign it, sessions compare it."""

from __future__ import annotations

import json

import pytest

from pyworker.protocol.canonical import CanonicalError, canonical_json


def test_a_whole_value_is_written_as_rfc_8785_does() -> None:
    value = {
        "numbers": [333333333.33333329, 1e30, 4.50, 2e-3, 1e-27],
        "string": '€$\u000f\nA\'B"\\\\"/',
        "literals": [None, True, False],
    }
    assert canonical_json(value) == (  # RFC 8785 section 3.2.2, its sample
        '{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
        '"string":"€$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}'
    )


def test_member_names_sort_by_utf16_code_units() -> None:
    names = ["\u20ac", "\r", "\ufb33", "1", "\U0001f600", "\u0080", "\u00f6"]
    written = json.loads(canonical_json(dict.fromkeys(names, 0)))
    assert list(written) == ["\r", "1", "\u0080", "\u00f6", "\u20ac", "\U0001f600", "\ufb33"]


@pytest.mark.parametrize(
    ("first", "second", "equal"),
    [
        ({"a": 10, "b": [1]}, {"b": [1.0], "a": 10.0}, True),
        (2**60, float(2**60), True),  # exact: beyond 2**53 too
        (2**60 + 1, float(2**60), False),
        (1, True, False),  # a boolean is not a number
        ("10", 10, False),
        (2**63 - 1, 2**63 - 2, False),
    ],
)
def test_with_exact_integers_two_values_have_one_text_when_equal_as_json(
    first: object, second: object, equal: bool
) -> None:
    texts = {canonical_json(value, exact_integers=True) for value in (first, second)}
    assert (len(texts) == 1) is equal


@pytest.mark.parametrize("value", [2**53, float("nan"), {1: "name"}, (1, 2), "\ud800"])
def test_what_has_no_canonical_form_is_refused(value: object) -> None:
    with pytest.raises(CanonicalError):
        canonical_json(value)
