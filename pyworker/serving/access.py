"""Who may see what: the worker's details are for whoever holds `MASTER_TOKEN`.

A worker listens on a public address. Anyone may learn its state and whether it is ready
(`/health`, `/ready`, `/status` without a token); the rest (the autoscaler's addresses, the
worker id, the model server's error lines, which may quote user data, the figures of `/metrics`)
is served only to a request bearing the token, compared in constant time. Without a token the
details are served to nobody, except in local mode, where the worker reports nowhere and
listens on loopback unless told otherwise (docs/security.md).
"""

from __future__ import annotations

import hmac
from enum import Enum

from aiohttp import web

from pyworker.config.environment import Environment
from pyworker.serving import refusals


class Access(Enum):
    ANONYMOUS = "anonymous"
    OPERATOR = "operator"


def bearer_token(header: str) -> str:
    """The token of `Bearer <token>`; a bare token too, as the reference accepts it."""
    scheme, _, credentials = header.strip().partition(" ")
    if scheme.lower() == "bearer":
        return credentials.strip()
    return header.strip()


def token_bytes(text: str) -> bytes:
    """Header text as the bytes that came in; aiohttp keeps non-UTF-8 bytes as surrogates."""
    return text.encode("utf-8", "surrogateescape")


class MasterToken:
    """Checks a request's `Authorization` against `MASTER_TOKEN`."""

    def __init__(self, environment: Environment) -> None:
        token = environment.master_token
        self.expected = token_bytes(token.get_secret_value()) if token is not None else None
        self.open = self.expected is None and environment.local

    def matches(self, request: web.Request) -> bool:
        if self.expected is None:
            return False
        given = token_bytes(bearer_token(request.headers.get("Authorization", "")))
        return hmac.compare_digest(given, self.expected)

    def access(self, request: web.Request) -> Access:
        """What this request may see; `Refused` for a token that is not ours."""
        if self.open:
            return Access.OPERATOR
        if "Authorization" not in request.headers:
            return Access.ANONYMOUS
        if self.expected is None:
            raise refusals.details_disabled()
        if not self.matches(request):
            raise refusals.invalid_token()
        return Access.OPERATOR
