"""JSON answers of the worker itself (not relayed from the model server)."""

from __future__ import annotations

import math
from typing import Any

import orjson
from aiohttp import web

from pyworker.lifecycle.state import WorkerStatus
from pyworker.protocol.auth import AuthData, Verdict, Verifier

NOT_READY_RETRY_AFTER = 5.0
MAX_RETRY_AFTER = 3600
"""Seconds: the longest Retry-After the worker gives, whatever its estimate says."""


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


def error_response(
    status: int, message: str, retry_after: float | None = None, **extra: Any
) -> web.Response:
    headers = None if retry_after is None else {"Retry-After": str(_whole_seconds(retry_after))}
    return json_response(status, {"error": message, **extra}, headers)


def _whole_seconds(seconds: float) -> int:
    if not math.isfinite(seconds):
        return MAX_RETRY_AFTER
    return max(1, min(round(seconds), MAX_RETRY_AFTER))


def signature_refusal(verifier: Verifier, auth: AuthData) -> web.Response | None:
    """The answer to a request whose auth_data does not pass, or None when it does."""
    if not verifier.has_key:
        return error_response(503, "public key not loaded yet", retry_after=NOT_READY_RETRY_AFTER)
    verdict = verifier.check(auth)  # strict mode: each auth_data is used up here
    if verdict is Verdict.ACCEPTED:
        return None
    if verdict is Verdict.BUSY:
        return error_response(503, verdict.value, retry_after=1.0)
    return error_response(401, verdict.value)


def not_ready_refusal(status: WorkerStatus) -> web.Response | None:
    """503 with Retry-After and the state while the worker is not ready, else None."""
    if status.ready:
        return None
    return error_response(
        503,
        f"worker is not ready: {status.state}",
        retry_after=NOT_READY_RETRY_AFTER,
        state=str(status.state),
    )
