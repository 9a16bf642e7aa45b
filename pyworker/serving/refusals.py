"""Refusals: every answer the worker gives instead of serving a request, in one place.

Each stage of the request path (the body, the envelope, the signature, the session, readiness,
the route's hooks, its workload and gate, the model server) refuses by raising `Refused`; the
`refusal_answers` middleware renders it, and counts it as rejected load when it says so. The
functions below are the status policy: which refusal is which HTTP status, with the message,
`Retry-After` and extra members of its JSON body, in the order of the table of the README's
"The request path" (docs/protocol.md gives the reference's codes, and the session routes').

A refusal raised before the ledger receives a request never reaches a report, so malformed,
unsigned and unready requests cannot move `cur_load` or the reported request ids; only a signed
request the worker has no room for (its route's gate, the session limit) is counted, as
rejected load (`rej_load`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from pyworker.lifecycle.accounting import Ledger
from pyworker.protocol.auth import Verdict
from pyworker.protocol.envelope import EnvelopeError
from pyworker.protocol.workload import WorkloadError
from pyworker.serving.responses import json_response

NOT_READY_RETRY_AFTER = 5.0
SESSIONS_FULL_RETRY_AFTER = 30.0
MAX_RETRY_AFTER = 3600
"""Seconds: the longest Retry-After the worker gives, whatever its estimate says."""


@dataclass(frozen=True, slots=True)
class Rejection:
    """A signed request turned away for want of room: what `rej_load` counts of it."""

    request_idx: int
    route: str
    workload: float


class Refused(Exception):
    """The worker will not serve this request: what the client is told, and how it is counted."""

    def __init__(
        self,
        http_status: int,
        message: str,
        *,
        retry_after: float | None = None,
        fields: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        close: bool = False,
        rejection: Rejection | None = None,
    ) -> None:
        super().__init__(http_status, message)
        self.http_status = http_status
        self.message = message
        self.retry_after = retry_after
        self.fields = fields
        """Members of the JSON body besides `error`."""
        self.headers = headers
        self.close = close
        """Close the connection after the answer: the rest of the body is not worth reading."""
        self.rejection = rejection
        """Set when the ledger counts it as rejected load; None when no report sees it."""


def render(refused: Refused) -> web.Response:
    """The JSON answer of a refusal: `{"error": message, ...fields}`, with its headers."""
    headers = dict(refused.headers) if refused.headers else None
    if refused.retry_after is not None:
        headers = headers or {}
        headers["Retry-After"] = str(_whole_seconds(refused.retry_after))
    body = {"error": refused.message}
    if refused.fields:
        body.update(refused.fields)
    response = json_response(refused.http_status, body, headers)
    if refused.close:
        response.force_close()
    return response


def refusal_answers(ledger: Ledger) -> Middleware:
    """The middleware that answers every `Refused`, and counts those that are rejected load."""

    @web.middleware
    async def answer(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except Refused as refused:
            rejection = refused.rejection
            if rejection is not None:
                ledger.reject(
                    rejection.request_idx, rejection.route, rejection.workload, refused.http_status
                )
            return render(refused)

    return answer


def _whole_seconds(seconds: float) -> int:
    if not math.isfinite(seconds):
        return MAX_RETRY_AFTER
    return max(1, min(round(seconds), MAX_RETRY_AFTER))


# --- the status policy, in the order of the request path (docs/protocol.md) ----------------
def body_too_large(max_size: int) -> Refused:
    return Refused(413, f"request body over {max_size} bytes", close=True)


def body_too_slow(seconds: float) -> Refused:
    return Refused(408, f"request body not received within {seconds:g} s", close=True)


def unverified_budget_spent() -> Refused:
    message = "the worker holds too many unverified request bodies: retry"
    return Refused(503, message, retry_after=1.0, close=True)


def invalid_body(error: EnvelopeError) -> Refused:
    """The envelope, a session query, or a session's options: every wrong field named."""
    return Refused(422, error.message, fields=error.fields)


def key_not_loaded() -> Refused:
    return Refused(503, "public key not loaded yet", retry_after=NOT_READY_RETRY_AFTER)


def signature_refused(verdict: Verdict) -> Refused:
    """A signature that does not pass: 401, but 503 when the verifier cannot remember more."""
    if verdict is Verdict.BUSY:
        return Refused(503, verdict.value, retry_after=1.0)
    return Refused(401, verdict.value)


def session_not_open() -> Refused:
    return Refused(410, "invalid session")


def not_ready(state: str) -> Refused:
    message = f"worker is not ready: {state}"
    return Refused(503, message, retry_after=NOT_READY_RETRY_AFTER, fields={"state": state})


def payload_refused_by_hook(error: ValueError) -> Refused:
    return Refused(422, f"invalid payload: {error}")


def hook_failed() -> Refused:
    return Refused(500, "the worker's request hook failed")


def payload_not_encodable(http_status: int, message: str, fields: Mapping[str, str]) -> Refused:
    """The route's body encoder refused the payload, with the status it chose (413, 422)."""
    return Refused(http_status, message, fields=fields)


def encoder_failed() -> Refused:
    return Refused(500, "the worker's body encoder failed")


def invalid_workload(error: WorkloadError) -> Refused:
    return Refused(422, "invalid request", fields=error.fields())


def gate_full(reason: str, wait: float | None, rejection: Rejection) -> Refused:
    """429: the route's queue is full, or its estimated wait (None unknown) is too long."""
    fields = {"estimated_wait": wait}
    return Refused(429, reason, retry_after=wait or 1.0, fields=fields, rejection=rejection)


def sessions_full(rejection: Rejection) -> Refused:
    retry_after = SESSIONS_FULL_RETRY_AFTER
    return Refused(429, "too many open sessions", retry_after=retry_after, rejection=rejection)


def model_failed(http_status: int, message: str) -> Refused:
    """No answer from the model server (502, 504) or the route's function (its own status)."""
    return Refused(http_status, message)


def internal_error() -> Refused:
    return Refused(500, "internal error in the worker")


# --- the session routes that take no signature --------------------------------------------
def session_unknown() -> Refused:
    return Refused(400, "session does not exist")


def session_auth_refused() -> Refused:
    return Refused(401, "session_auth is not valid")


def session_closed() -> Refused:
    return Refused(410, "session already closed")


# --- the worker's own routes: MASTER_TOKEN (docs/security.md) ----------------------------
BEARER = {"WWW-Authenticate": "Bearer"}


def invalid_token() -> Refused:
    return Refused(401, "invalid token", headers=BEARER)


def details_disabled() -> Refused:
    return Refused(403, "details are disabled: MASTER_TOKEN is not set")


def metrics_need_token() -> Refused:
    return Refused(401, "/metrics needs Authorization: Bearer <MASTER_TOKEN>", headers=BEARER)


def updates_disabled() -> Refused:
    return Refused(403, "updates are disabled: MASTER_TOKEN is not set")


def update_marker_unwritable() -> Refused:
    return Refused(500, "cannot write the update marker")


# --- what aiohttp refuses before a handler runs (pyworker.serving.http_errors) -----------
def expectation_failed() -> Refused:
    return Refused(417, "only Expect: 100-continue is understood", close=True)


def malformed_body() -> Refused:
    return Refused(400, "malformed request body", close=True)
