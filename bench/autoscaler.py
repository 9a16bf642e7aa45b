"""A stand-in autoscaler: it signs requests, serves its public key and swallows reports.

The worker under test fetches `/pubkey/` at start-up and so verifies every request's
signature (`UNSECURED=false`); its status reports land here, counted, the latest kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from pyworker.protocol.messages import DELETE_REQUESTS_PATH, PUBKEY_PATH, STATUS_PATH
from pyworker.protocol.signing import SigningKey


class Signer:
    """The autoscaler's RSA key pair and the reference signature over a worker url."""

    def __init__(self) -> None:
        self._key = SigningKey.generate()
        self.pem = self._key.public_pem

    def sign(self, url: str) -> str:
        return self._key.sign(url)


@dataclass
class Reports:
    counts: dict[str, int] = field(default_factory=dict)
    last_status: dict[str, Any] = field(default_factory=dict)
    """The latest `/worker_status/` body (its `max_perf` is what the autoscaler would use)."""


def create_app(signer: Signer, reports: Reports) -> web.Application:
    async def pubkey(request: web.Request) -> web.Response:
        return web.Response(body=signer.pem, content_type="text/plain")

    async def report(request: web.Request) -> web.Response:
        body = await request.read()
        reports.counts[request.path] = reports.counts.get(request.path, 0) + 1
        if request.path == STATUS_PATH:
            try:
                document = orjson.loads(body)
            except orjson.JSONDecodeError:
                document = None
            if isinstance(document, dict):
                reports.last_status = document
        return web.json_response({})

    app = web.Application()
    app.router.add_get(PUBKEY_PATH, pubkey)
    app.router.add_post(STATUS_PATH, report)
    app.router.add_post(DELETE_REQUESTS_PATH, report)
    return app
