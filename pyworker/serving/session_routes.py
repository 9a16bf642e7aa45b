"""The session routes of docs/protocol.md: `/session/create`, `/get`, `/health` and `/end`.

Unlike the reference, `/session/create` is a signed request like any other (422 for a bad
body, 401 for a bad signature, 503 while not ready, 429 at the session limit), and bodies are
capped at `sessions.max_body_size`. `/session/end` is also served on the plain-HTTP side port
(`create_side_app`), for webhooks that cannot speak TLS.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pyworker.protocol.auth import AuthData
from pyworker.protocol.envelope import EnvelopeError, describe_errors, parse_envelope, parse_object
from pyworker.protocol.passthrough import TooDeep, encodable
from pyworker.serving.http_errors import expect_handler, json_errors
from pyworker.serving.responses import (
    error_response,
    json_response,
    not_ready_refusal,
    signature_refusal,
)
from pyworker.serving.sessions import SESSION_ROUTE, Session, SessionLimit, check_close_route

if TYPE_CHECKING:
    from pyworker.serving.app import Worker

FULL_RETRY_AFTER = 30.0
MAX_SESSION_ID = 256


class SessionOptions(BaseModel):
    """The payload of `/session/create`."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    lifetime: float = Field(default=60.0, gt=0, allow_inf_nan=False)
    on_close_route: str | None = None
    on_close_payload: dict[str, Any] | None = None

    @field_validator("lifetime", mode="before")
    @classmethod
    def _number(cls, value: object) -> object:
        if isinstance(value, bool):
            raise ValueError("must be a number of seconds")
        return value

    @field_validator("on_close_route")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        return None if value is None else check_close_route(value)


class SessionQuery(BaseModel):
    """The body of `/session/get`, `/health` and `/end`."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    session_id: str = Field(min_length=1, max_length=MAX_SESSION_ID)
    session_auth: dict[str, Any]


class SessionRoutes:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.store = worker.sessions
        self.max_body = worker.config.sessions.max_body_size

    def register(self, app: web.Application) -> None:
        expect = expect_handler(self.max_body)
        app.router.add_post("/session/create", self.create, expect_handler=expect)
        app.router.add_post("/session/get", self.get, expect_handler=expect)
        app.router.add_post("/session/health", self.health, expect_handler=expect)
        app.router.add_post("/session/end", self.end, expect_handler=expect)
        app.cleanup_ctx.append(self._sweeping)

    async def _sweeping(self, app: web.Application) -> AsyncIterator[None]:
        """Sweep expired sessions while the app runs; close the rest when it stops."""
        self.worker.spawn(self.store.run_sweeps, "session-sweep")
        yield
        await self.store.close_all()

    # --- routes -------------------------------------------------------------------------
    async def create(self, request: web.Request) -> web.Response:
        body = await read_body(request, self.max_body)
        if body is None:
            return error_response(413, f"request body over {self.max_body} bytes")
        try:
            envelope = parse_envelope(body)
            options = _options(envelope.payload, self.store.config.max_lifetime)
            encodable([envelope.auth_fields])  # /session/get answers with it, one level down
        except EnvelopeError as error:
            return json_response(422, error.body())
        except TooDeep as error:
            return json_response(422, {"error": "invalid request", "auth_data": str(error)})
        refused = self._check_signature(envelope.auth) or not_ready_refusal(self.worker.status)
        if refused is not None:
            return refused
        auth = envelope.auth
        try:
            session = self.store.open(
                auth,
                options.lifetime,
                options.on_close_route,
                options.on_close_payload,
                envelope.auth_fields,
            )
        except SessionLimit:
            self.worker.ledger.reject(auth.request_idx, SESSION_ROUTE, auth.cost, 429)
            return error_response(429, "too many open sessions", retry_after=FULL_RETRY_AFTER)
        return json_response(
            201, {"session_id": session.session_id, "expiration": session.expiration}
        )

    async def get(self, request: web.Request) -> web.Response:
        query = await self._query(request)
        if isinstance(query, web.Response):
            return query
        found = self._authorized_session(query)
        if isinstance(found, web.Response):
            return found
        return json_response(200, found.describe())

    async def health(self, request: web.Request) -> web.Response:
        query = await self._query(request)
        if isinstance(query, web.Response):
            return query
        session = self.store.find(query.session_id)
        if session is None:
            return json_response(200, {"ok": False})
        if not self.store.authorized(session, query.session_auth):
            return error_response(401, "session_auth is not valid")
        return json_response(200, {"ok": True})

    async def end(self, request: web.Request) -> web.Response:
        query = await self._query(request)
        if isinstance(query, web.Response):
            return query
        if self.store.was_closed(query.session_id):
            return error_response(410, "session already closed")
        found = self._authorized_session(query)
        if isinstance(found, web.Response):
            return found
        self.store.close(found)
        return json_response(200, {"ended": True, "removed_session": found.session_id})

    # --- shared steps -------------------------------------------------------------------
    async def _query(self, request: web.Request) -> SessionQuery | web.Response:
        body = await read_body(request, self.max_body)
        if body is None:
            return error_response(413, f"request body over {self.max_body} bytes")
        try:
            document = parse_object(body)
            encodable(document)
            return SessionQuery.model_validate(document)
        except EnvelopeError as error:
            return json_response(422, error.body())
        except TooDeep as error:
            return error_response(422, f"request body {error}")
        except ValidationError as error:
            return _invalid(error)

    def _authorized_session(self, query: SessionQuery) -> Session | web.Response:
        """The open session the query names and proves; else the answer saying why not."""
        session = self.store.find(query.session_id)
        if session is None:
            return error_response(400, "session does not exist")
        if not self.store.authorized(session, query.session_auth):
            return error_response(401, "session_auth is not valid")
        return session

    def _check_signature(self, auth: AuthData) -> web.Response | None:
        if self.worker.environment.unsecured:
            return None
        return signature_refusal(self.worker.verifier, auth)


def create_side_app(worker: Worker) -> web.Application:
    """The plain-HTTP side port's app: `/session/end` and nothing else."""
    max_body = worker.config.sessions.max_body_size
    app = web.Application(client_max_size=max_body, middlewares=[json_errors])
    app.router.add_post(
        "/session/end", SessionRoutes(worker).end, expect_handler=expect_handler(max_body)
    )
    return app


async def read_body(request: web.Request, limit: int) -> bytes | None:
    """The request body, or None when it is over `limit` bytes (declared or streamed)."""
    if request.content_length is not None and request.content_length > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _options(payload: dict[str, Any], max_lifetime: float) -> SessionOptions:
    try:
        options = SessionOptions.model_validate(payload)
    except ValidationError as error:
        raise EnvelopeError("invalid request", {"payload": describe_errors(error)}) from None
    if options.lifetime > max_lifetime:
        problem = {"lifetime": f"must be at most {max_lifetime:g} seconds"}
        raise EnvelopeError("invalid request", {"payload": problem})
    return options


def _invalid(error: ValidationError) -> web.Response:
    fields = describe_errors(error)
    if any(item["type"] == "json_invalid" for item in error.errors(include_url=False)):
        return error_response(422, "request body is not valid JSON")
    if any(item["type"] == "model_type" for item in error.errors(include_url=False)):
        return error_response(422, "request body must be a JSON object")
    return json_response(422, {"error": "invalid request", **fields})
