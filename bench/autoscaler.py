"""A stand-in autoscaler: it signs requests, serves its public key and swallows reports.

The worker under test fetches `/pubkey/` at start-up and so verifies every request's
signature (`UNSECURED=false`); its status reports land here, counted, the latest kept.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from pyworker.protocol.auth import reference_message


class Signer:
    """The autoscaler's RSA key pair and the reference signature over a worker url."""

    def __init__(self) -> None:
        self._private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.pem = self._private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, url: str) -> str:
        signature = self._private.sign(reference_message(url), padding.PKCS1v15(), hashes.SHA256())
        return base64.b64encode(signature).decode()


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
        if request.path == "/worker_status/":
            try:
                document = orjson.loads(body)
            except orjson.JSONDecodeError:
                document = None
            if isinstance(document, dict):
                reports.last_status = document
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/pubkey/", pubkey)
    app.router.add_post("/worker_status/", report)
    app.router.add_post("/delete_requests/", report)
    return app
