"""Admission: the checks every signed request passes before the worker does any work for it.

One `Admission` serves the routes of the config (pyworker.serving.routes) and `/session/create`
(pyworker.serving.session_routes), in the order of docs/protocol.md, cheapest and most hostile
input first; each check refuses by raising `Refused` (pyworker.serving.refusals says which
status each gets):

1. the body, read within the budget of unverified bytes: too large, too slow
   (pyworker.serving.limits), or the budget spent (pyworker.serving.unverified);
2. the envelope, every field that is wrong named (pyworker.protocol.envelope);
3. the signature, once the public key is loaded; the auth_data a session was created with
   passes for that session's requests;
4. the session, when the request names one: it must be open, and its expiry is pushed back;
5. readiness: the worker must be ready.

The route then runs its hooks, workload and gate. The session routes that take no signature
(`/session/get`, `/health`, `/end`) read their body with `read` (step 1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

from aiohttp import web

from pyworker.lifecycle.state import WorkerStatus
from pyworker.protocol.auth import AuthData, Verdict, Verifier
from pyworker.protocol.envelope import Envelope, EnvelopeError, parse_envelope
from pyworker.serving import refusals
from pyworker.serving.sessions import Session, SessionStore
from pyworker.serving.unverified import UnverifiedBytes

T = TypeVar("T")


Admitted = tuple[Envelope, Session | None]
"""A request that passed admission: its envelope, and the open session it was made on (a
tuple: the cheapest thing to make once per request)."""


@dataclass(frozen=True, slots=True)
class Admission:
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
    ) -> Admission:
        """The same checks for other routes: another body limit, parser, or no sessions."""
        return replace(self, max_size=max_size, parse=parse, on_sessions=sessions)

    async def admit(self, request: web.Request) -> Admitted:
        """Steps 1 to 5: the admitted request; `Refused` by the first check it fails."""
        envelope = await self.read(request, self.parse)
        sessions = self.sessions
        session_id = envelope.session_id if self.on_sessions else None
        verifier = self.verifier
        if verifier is not None and (
            session_id is None or sessions.bound(session_id, envelope.auth_fields) is None
        ):
            verify(verifier, envelope.auth)
        session = None
        if session_id is not None:
            session = sessions.extend(session_id)
            if session is None:
                raise refusals.session_not_open()
        status = self.status
        if not status.ready:
            raise refusals.not_ready(str(status.state))
        return envelope, session

    async def read(self, request: web.Request, parse: Callable[[bytes], T]) -> T:
        """Step 1 and `parse` (which raises EnvelopeError for a 422): for unsigned bodies too."""
        try:
            return await self.unverified.read(request, self.max_size, parse)
        except EnvelopeError as error:
            raise refusals.invalid_body(error) from None


def verify(verifier: Verifier, auth: AuthData) -> None:
    """Step 3: `Refused` unless `auth` passes; in strict mode this uses the auth_data up."""
    if not verifier.has_key:
        raise refusals.key_not_loaded()
    verdict = verifier.check(auth)
    if verdict is not Verdict.ACCEPTED:
        raise refusals.signature_refused(verdict)
