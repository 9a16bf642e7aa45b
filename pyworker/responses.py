"""JSON answers of the worker itself (not relayed from the model server)."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


def error_response(
    status: int, message: str, retry_after: float | None = None, **extra: Any
) -> web.Response:
    headers = None if retry_after is None else {"Retry-After": str(max(1, round(retry_after)))}
    return json_response(status, {"error": message, **extra}, headers)
