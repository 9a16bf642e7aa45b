"""JSON answers of the worker itself (not relayed from the model server).

A refusal's answer is rendered in pyworker.serving.refusals; this is the encoding both share.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web


def json_response(
    http_status: int, body: Any, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=http_status,
        body=orjson.dumps(body),
        content_type="application/json",
        headers=headers,
    )
