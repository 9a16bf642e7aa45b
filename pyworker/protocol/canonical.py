"""Canonical JSON: one text per JSON value, the JSON Canonicalization Scheme (RFC 8785).

Members sorted by name, no whitespace, strings in UTF-8 with only `"`, `\\` and controls
escaped, numbers as ECMAScript writes them. Strict signatures sign it
(pyworker.protocol.strict); a session compares `session_auth` with it
(pyworker.serving.sessions), where `exact_integers` writes every integral number as its exact
integer, so that two values have one text exactly when they are equal as JSON (`10` and `10.0`
are one number, whatever their size).
"""

from __future__ import annotations

import math
from decimal import Decimal
from json.encoder import encode_basestring as encode_string
from typing import Any

MAX_SAFE_INTEGER = 2**53 - 1
"""Beyond it a JSON number is not exact in every language, so it cannot be signed portably."""


NUMBERS = (int, float)


class CanonicalError(ValueError):
    """A value that has no canonical JSON form (not finite, unsafe integer, lone surrogate)."""


def canonical_json(value: object, *, exact_integers: bool = False) -> str:
    """The canonical text of a JSON value (None, bool, str, int, float, list, dict by str)."""
    if isinstance(value, str):
        return canonical_string(value)
    if value is None or isinstance(value, bool):
        return "null" if value is None else "true" if value else "false"
    if isinstance(value, NUMBERS):
        return canonical_number(value, exact_integers=exact_integers)
    if isinstance(value, list):
        items = [canonical_json(item, exact_integers=exact_integers) for item in value]
        return "[" + ",".join(items) + "]"
    if isinstance(value, dict):
        members = [
            f"{canonical_string(name)}:{canonical_json(value[name], exact_integers=exact_integers)}"
            for name in _sorted_names(value)
        ]
        return "{" + ",".join(members) + "}"
    raise CanonicalError(f"a {type(value).__name__} is not a JSON value")


def _sorted_names(members: dict[Any, object]) -> list[str]:
    """RFC 8785 sorts member names by their UTF-16 code units: code point order, but for
    characters past U+FFFF, which only a name that is not ASCII can hold."""
    ascii_only = True
    for name in members:
        if not isinstance(name, str):
            raise CanonicalError("a member name must be a string")
        ascii_only = ascii_only and name.isascii()
    if ascii_only:
        return sorted(members)
    return sorted(members, key=lambda name: name.encode("utf-16-be", "surrogatepass"))


def canonical_number(value: int | float, *, exact_integers: bool = False) -> str:
    """A number as RFC 8785 writes it (ECMAScript's Number.prototype.toString).

    With `exact_integers`, an integral number is written as its exact integer instead (RFC
    8785 refuses an integer beyond 2**53 and writes a large float's shortest digits): for
    comparing values, never for signing them."""
    if isinstance(value, bool):
        raise CanonicalError("a boolean is not a number")
    if exact_integers and (isinstance(value, int) or value.is_integer()):
        return str(int(value))
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
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise CanonicalError("string holds a lone surrogate") from None
    return encode_string(value)
