"""Admission: the checks every signed request passes before the worker does any work for it.

One pipeline serves the routes of the config (pyworker.serving.routes) and `/session/create`
(pyworker.serving.session_routes), in the order of docs/protocol.md, cheapest and most hostile
input first:

1. the body, read within the budget of unverified bytes: 413 too large, 408 too slow
   (pyworker.serving.limits), 503 while the budget is spent (pyworker.serving.unverified);
2. the envelope: 422 names every field that is wrong (pyworker.protocol.envelope);
3. the signature: 401, or 503 until the public key is loaded; the auth_data a session was
   created with passes for that session's requests;
4. the session, when the request names one: 410 when it is not open, else its expiry is pushed
   back;
5. readiness: 503 with Retry-After while the worker is not ready.

The route then runs its hooks and workload (422) and its gate (429). The session routes that
take no signature (`/session/get`, `/health`, `/end`) read their body with `read` (step 1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

from aiohttp import web

from pyworker.lifecycle.state import WorkerStatus
from pyworker.protocol.auth import Verifier
from pyworker.protocol.envelope import Envelope, EnvelopeError, parse_envelope
from pyworker.serving.responses import (
    error_response,
    json_response,
    not_ready_refusal,
    signature_refusal,
)
from pyworker.serving.sessions import Session, SessionStore
from pyworker.serving.unverified import BodyRefused, UnverifiedBytes

T = TypeVar("T")


Admitted = tuple[Envelope, Session | None]
"""A request that passed admission: its envelope, and the open session it was made on (a
tuple: the cheapest thing to make once per request)."""


@dataclass(frozen=True, slots=True)
class Pipeline:
    """Admission for the requests of one body limit; built once per route, not per request."""

    unverified: UnverifiedBytes
    verifier: Verifier | None
    """None when signatures are not checked (UNSECURED)."""
    sessions: SessionStore
    status: WorkerStatus
    max_size: int
    parse: Callable[[bytes], Envelope] = parse_envelope
    """Step 2; `/session/create` also checks its options here, before the signature."""
    on_sessions: bool = True
    """False where a `session_id` means nothing (`/session/create` opens a session)."""

    def limited(
        self,
        max_size: int,
        parse: Callable[[bytes], Envelope] = parse_envelope,
        sessions: bool = True,
    ) -> Pipeline:
        """The same checks for other routes: another body limit, parser, or no sessions."""
        return replace(self, max_size=max_size, parse=parse, on_sessions=sessions)

    async def admit(self, request: web.Request) -> Admitted | web.Response:
        """Steps 1 to 5: the admitted request, or the answer of the first check it fails."""
        try:
            envelope = await self.unverified.read(request, self.max_size, self.parse)
        except BodyRefused as unread:
            return unread.response
        except EnvelopeError as error:
            return json_response(422, error.body())
        sessions = self.sessions
        session_id = envelope.session_id if self.on_sessions else None
        verifier = self.verifier
        if verifier is not None and (
            session_id is None or sessions.bound(session_id, envelope.auth_fields) is None
        ):
            refused = signature_refusal(verifier, envelope.auth)
            if refused is not None:
                return refused
        session = None
        if session_id is not None:
            session = sessions.extend(session_id)
            if session is None:
                return error_response(410, "invalid session")
        refused = not_ready_refusal(self.status)
        if refused is not None:
            return refused
        return envelope, session

    async def read(self, request: web.Request, parse: Callable[[bytes], T]) -> T | web.Response:
        """Step 1 and `parse` (which raises EnvelopeError for a 422): for unsigned bodies."""
        try:
            return await self.unverified.read(request, self.max_size, parse)
        except BodyRefused as refused:
            return refused.response
        except EnvelopeError as error:
            return json_response(422, error.body())
