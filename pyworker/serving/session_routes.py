"""The session routes of docs/protocol.md: `/session/create`, `/get`, `/health` and `/end`.

Unlike the reference, `/session/create` is a signed request like any other (422 for a bad
body, 401 for a bad signature, 503 while not ready, 429 at the session limit), admitted by the
same admission as every route (pyworker.serving.admission). Bodies are capped at
`sessions.max_body_size` and read within the budget of unverified bytes. `/session/end` is
also served on the plain-HTTP side port (`create_side_app`), for webhooks that cannot speak TLS.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pyworker.lifecycle.accounting import Ledger
from pyworker.protocol.depth import deep_members
from pyworker.protocol.envelope import (
    Envelope,
    EnvelopeError,
    describe_errors,
    parse_envelope,
    parse_object,
)
from pyworker.protocol.passthrough import TooDeep, encodable
from pyworker.serving import refusals
from pyworker.serving.admission import Admission
from pyworker.serving.http_errors import expect_handler, json_errors
from pyworker.serving.refusals import Rejection, refusal_answers
from pyworker.serving.responses import json_response
from pyworker.serving.sessions import (
    SESSION_ROUTE,
    Session,
    SessionLimit,
    SessionStore,
    check_close_route,
)

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


@dataclass(slots=True)
class SessionRequest(Envelope):
    """The body of `/session/create`: an envelope whose payload holds valid options."""

    options: SessionOptions


class SessionRoutes:
    """The four session routes; `/session/create` is admitted as any signed request is."""

    def __init__(self, admission: Admission, store: SessionStore, ledger: Ledger) -> None:
        max_lifetime = store.config.max_lifetime
        max_body = store.config.max_body_size
        self.admission = admission.limited(
            max_body, partial(parse_create, max_lifetime=max_lifetime), sessions=False
        )
        self.reader = admission.limited(max_body)
        self.store = store
        self.ledger = ledger
        self.max_body = max_body

    def register(self, app: web.Application) -> None:
        expect = expect_handler(self.max_body)
        app.router.add_post("/session/create", self.create, expect_handler=expect)
        app.router.add_post("/session/get", self.get, expect_handler=expect)
        app.router.add_post("/session/health", self.health, expect_handler=expect)
        app.router.add_post("/session/end", self.end, expect_handler=expect)

    # --- routes -------------------------------------------------------------------------
    async def create(self, request: web.Request) -> web.Response:
        envelope, _ = await self.admission.admit(request)
        assert isinstance(envelope, SessionRequest)  # parse_create made it
        auth, options = envelope.auth, envelope.options
        try:
            session = self.store.open(
                auth,
                options.lifetime,
                options.on_close_route,
                options.on_close_payload,
                envelope.auth_fields,
            )
        except SessionLimit:
            rejection = Rejection(auth.request_idx, SESSION_ROUTE, auth.cost)
            raise refusals.sessions_full(rejection) from None
        return json_response(
            201, {"session_id": session.session_id, "expiration": session.expiration}
        )

    async def get(self, request: web.Request) -> web.Response:
        query = await self.reader.read(request, parse_query)
        found = self._authorized_session(query)
        return json_response(200, found.describe())

    async def health(self, request: web.Request) -> web.Response:
        query = await self.reader.read(request, parse_query)
        session = self.store.find(query.session_id)
        if session is None:
            return json_response(200, {"ok": False})
        if not self.store.authorized(session, query.session_auth):
            raise refusals.session_auth_refused()
        return json_response(200, {"ok": True})

    async def end(self, request: web.Request) -> web.Response:
        query = await self.reader.read(request, parse_query)
        if self.store.was_closed(query.session_id):
            raise refusals.session_closed()
        found = self._authorized_session(query)
        self.store.close(found)
        return json_response(200, {"ended": True, "removed_session": found.session_id})

    def _authorized_session(self, query: SessionQuery) -> Session:
        """The open session the query names and proves; else `Refused` saying why not."""
        session = self.store.find(query.session_id)
        if session is None:
            raise refusals.session_unknown()
        if not self.store.authorized(session, query.session_auth):
            raise refusals.session_auth_refused()
        return session


def create_side_app(routes: SessionRoutes) -> web.Application:
    """The plain-HTTP side port's app: `/session/end` and nothing else."""
    middlewares = [json_errors, refusal_answers(routes.ledger)]
    app = web.Application(client_max_size=routes.max_body, middlewares=middlewares)
    app.router.add_post("/session/end", routes.end, expect_handler=expect_handler(routes.max_body))
    return app


def parse_create(body: bytes, max_lifetime: float) -> SessionRequest:
    """The envelope of `/session/create` with its options: EnvelopeError (422) when invalid."""
    envelope = parse_envelope(body)
    options = _options(envelope.payload, max_lifetime)
    try:
        encodable([envelope.auth_fields])  # /session/get answers with it, one level down
    except TooDeep as error:
        raise EnvelopeError("invalid request", {"auth_data": str(error)}) from None
    return SessionRequest(
        envelope.auth,
        envelope.payload,
        envelope.session_id,
        envelope.payload_bytes,
        envelope.auth_fields,
        options,
    )


def parse_query(body: bytes) -> SessionQuery:
    """The body of `/session/get`, `/health` and `/end`: EnvelopeError (422) when invalid."""
    document = parse_object(body)
    deep = deep_members(document)
    if deep:
        raise EnvelopeError("invalid request", deep)
    try:
        return SessionQuery.model_validate(document)
    except ValidationError as error:
        raise _invalid(error) from None


def _options(payload: dict[str, Any], max_lifetime: float) -> SessionOptions:
    try:
        options = SessionOptions.model_validate(payload)
    except ValidationError as error:
        raise EnvelopeError("invalid request", {"payload": describe_errors(error)}) from None
    if options.lifetime > max_lifetime:
        problem = {"lifetime": f"must be at most {max_lifetime:g} seconds"}
        raise EnvelopeError("invalid request", {"payload": problem})
    return options


def _invalid(error: ValidationError) -> EnvelopeError:
    problems = error.errors(include_url=False)
    if any(item["type"] == "json_invalid" for item in problems):
        return EnvelopeError("request body is not valid JSON")
    if any(item["type"] == "model_type" for item in problems):
        return EnvelopeError("request body must be a JSON object")
    return EnvelopeError("invalid request", describe_errors(error))
