"""Parsing the client's request body: `{"auth_data": {...}, "payload": {...}, "session_id": ...}`.

Every problem is collected and named by field, in the reference's shape
(`{"auth_data": {"reqnum": "missing parameter"}}`), so a client fixes all of them at once. A
body with neither field (a model server's request sent straight to the worker) also gets a
`hint` saying that requests go through the autoscaler's `/route/` first.
Every number a client controls is checked here, where it enters (pyworker.protocol.auth, and the
workload in pyworker.config), and so is how deeply every member nests (`MAX_DEPTH`, in
pyworker.protocol.passthrough): nothing past this point can fail on what a client sent, and a
member too deep for any parser here is still named in the 422 (pyworker.protocol.depth).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ValidationError

from pyworker.protocol.auth import NUMBER_FIELDS, AuthData
from pyworker.protocol.depth import TOO_DEEP, deep_members, member_past_depth
from pyworker.protocol.passthrough import TooDeep, payload_bytes

FieldErrors = dict[str, Any]
LARGE_BODY = 1024 * 1024
"""Bodies above this size are parsed by `_load_large`; below it orjson is faster by far."""
ENVELOPE_HINT = (
    'a worker takes {"auth_data": ..., "payload": ...}, not the model server\'s request: '
    'POST {"endpoint": ..., "cost": ...} to the autoscaler\'s /route/ first, then send its '
    "answer as auth_data and your request as payload (`pyworker call ROUTE --data JSON` does both)"
)
"""Added to the 422 of a body with neither field: most likely a model request sent directly."""
BOOLEAN = "must be a number, not a boolean"


class EnvelopeError(ValueError):
    """The body cannot be served; `fields` says why, field by field."""

    def __init__(self, message: str, fields: FieldErrors | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields or {}

    def body(self) -> dict[str, Any]:
        return {"error": self.message, **self.fields}


@dataclass(slots=True)
class Envelope:
    auth: AuthData
    payload: dict[str, Any]
    session_id: str | None
    payload_bytes: bytes
    """The payload as the client wrote it: what the model server receives, unless a hook
    changes the payload."""
    auth_fields: dict[str, Any]
    """auth_data as sent, extra keys included: what a session's `session_auth` must equal."""


def parse_object(body: bytes) -> dict[str, Any]:
    """The JSON object `body` holds; EnvelopeError when it holds anything else."""
    if not body.strip():
        raise EnvelopeError("request body is empty: expected a JSON object")
    try:
        document = orjson.loads(body) if len(body) <= LARGE_BODY else _load_large(body)
    except (
        orjson.JSONDecodeError,
        json.JSONDecodeError,
        UnicodeDecodeError,
        RecursionError,
    ) as error:
        deep = member_past_depth(body) if _depth_error(error) else None
        if deep is not None:
            raise EnvelopeError("invalid request", deep) from None
        raise EnvelopeError(f"request body is not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise EnvelopeError("request body must be a JSON object")
    return document


def _depth_error(error: Exception) -> bool:
    """Whether a parser gave up on nesting (orjson past 1024 levels, the standard one at the
    recursion limit), not on bad JSON."""
    text = str(error)
    return isinstance(error, RecursionError) or "depth limit" in text or "recursion" in text


def parse_envelope(body: bytes) -> Envelope:
    document = parse_object(body)
    # Members other than the payload first: walking the body for the payload's bytes, or
    # comparing a session's auth_data, must never meet a value nested past MAX_DEPTH.
    deep = deep_members(document, skip="payload")
    fields: FieldErrors = dict(deep)
    raw_auth = document.get("auth_data")
    auth = None if "auth_data" in deep else _auth_data(raw_auth, fields)
    payload = document.get("payload")
    forwarded = b""
    if payload is None:
        fields["payload"] = "missing parameter"
    elif not isinstance(payload, dict):
        fields["payload"] = "must be a JSON object"
    elif not deep:
        try:
            forwarded = payload_bytes(body, payload)
        except TooDeep as error:
            fields["payload"] = str(error)
        except RecursionError:  # a deep duplicate key: the body's walk met the one not kept
            fields.update(member_past_depth(body) or {"payload": TOO_DEEP})
    session_id = document.get("session_id")
    if session_id is not None and not isinstance(session_id, str):
        fields.setdefault("session_id", "must be a string or null")
    if fields or auth is None or not isinstance(payload, dict) or not isinstance(raw_auth, dict):
        if "auth_data" not in document and "payload" not in document:
            fields["hint"] = ENVELOPE_HINT
        raise EnvelopeError("invalid request", fields)
    return Envelope(auth, payload, session_id, forwarded, raw_auth)


def _load_large(body: bytes) -> Any:
    """The standard library's parser, for bodies that carry uploads: orjson's peak memory on
    a document that is mostly one long string is about 13 times its size (346 MiB for a
    20 MiB upload's 27 MiB of base64), the standard parser's 2 times (and 59 ms, not 42).
    It reads what orjson reads: UTF-8 only, no NaN or Infinity, no number that overflows a
    double, integers past 64 bits as floats; a body with escaped surrogates (where only
    orjson rejects a lone one) goes to orjson."""
    if b"\\ud" in body or b"\\uD" in body:
        return orjson.loads(body)
    return json.loads(
        body.decode("utf-8"),
        parse_constant=_not_json,
        parse_float=_finite_float,
        parse_int=_integer,
    )


def _not_json(text: str) -> Any:
    raise json.JSONDecodeError(f"{text} is not JSON", text, 0)


def _finite_float(text: str) -> float:
    number = float(text)
    if math.isinf(number):
        raise json.JSONDecodeError("number is infinity when parsed as a double", text, 0)
    return number


def _integer(text: str) -> int | float:
    number = int(text)
    return number if -(2**63) <= number < 2**64 else _finite_float(text)


def _auth_data(raw: object, fields: FieldErrors) -> AuthData | None:
    if raw is None:
        fields["auth_data"] = "missing parameter"
        return None
    if not isinstance(raw, dict):
        fields["auth_data"] = "must be a JSON object"
        return None
    booleans = _booleans(raw)
    try:
        auth = AuthData.model_validate(raw)
    except ValidationError as error:
        fields["auth_data"] = describe_errors(error) | booleans
        return None
    if booleans:
        fields["auth_data"] = booleans
        return None
    return auth


def _booleans(auth: dict[str, Any]) -> dict[str, str]:
    """The number fields that hold a boolean: pydantic would read `true` as 1."""
    get = auth.get
    if not (
        type(get("cost")) is bool or type(get("reqnum")) is bool or type(get("request_idx")) is bool
    ):
        return {}
    return {name: BOOLEAN for name in NUMBER_FIELDS if type(get(name)) is bool}


def describe_errors(error: ValidationError) -> dict[str, str]:
    described: dict[str, str] = {}
    for item in error.errors(include_url=False):
        name = ".".join(str(part) for part in item["loc"])
        described[name] = "missing parameter" if item["type"] == "missing" else item["msg"]
    return described
