"""Sessions: a client's hold on this worker for a while, extended each time it is used.

The reference keeps sessions in a plain dict with guessable ids, no bounds, and a close
callback that may reach any URL. Here ids are 192-bit secrets, open sessions and their
lifetimes are bounded, `session_auth` must equal the auth_data the session was created with
exactly, as in the reference (same keys, same values; `10` and `10.0` are the same number, but
`"10"` and `true` are not numbers), compared in constant time, and the close callback can only
reach a path on the model server, with a timeout and no redirects.

A session is accounted like a request: a ledger record opened at create and finished at close,
so its cost counts in `cur_load` while it is open and its `request_idx` is then reported done.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import orjson

from pyworker.config import SessionConfig
from pyworker.lifecycle.accounting import Ledger, Outcome, RequestRecord
from pyworker.lifecycle.supervision import logged
from pyworker.protocol.auth import AuthData
from pyworker.protocol.canonical import canonical_json
from pyworker.upstream.errors import UpstreamError
from pyworker.upstream.model import ModelClient

logger = logging.getLogger(__name__)

SESSION_ROUTE = "/session"
"""The route name of session records in the ledger."""
SESSION_ID_BYTES = 24
NOTIFY_CONCURRENCY = 16
MAX_CLOSE_ROUTE = 2048
# A path on the model server: one leading slash (two would name another host), then only
# RFC 3986 path and query characters: no scheme, no backslash, no space, no fragment.
CLOSE_ROUTE = re.compile(
    r"/(?!/)[A-Za-z0-9\-._~!$&'()*+,;=:@%/]*(\?[A-Za-z0-9\-._~!$&'()*+,;=:@%/?]*)?"
)


class SessionLimit(Exception):
    """The worker holds as many open sessions as it may."""


def check_close_route(route: str) -> str:
    """`route` if it is a path on the model server; ValueError for anything that leaves it."""
    if len(route) > MAX_CLOSE_ROUTE or not CLOSE_ROUTE.fullmatch(route):
        raise ValueError("must be a path on the model server, such as /session_closed")
    return route


def auth_digest(auth_fields: object) -> bytes:
    """A fixed-length fingerprint of a JSON value, so comparing two takes the same time always.

    Two values have the same fingerprint when they are equal as JSON: objects with the same
    keys (in any order) and equal values, numbers equal in value; a boolean is not a number.
    """
    return hashlib.sha256(canonical_json(auth_fields, exact_integers=True).encode()).digest()


@dataclass(slots=True, eq=False)
class Session:
    session_id: str
    on_close_route: str | None
    on_close_payload: dict[str, Any] | None
    record: RequestRecord
    auth: AuthData
    auth_fields: dict[str, Any]
    """auth_data as the client sent it: what `/session/get` answers, what session_auth equals."""
    lifetime: float
    created_at: float
    """Epoch seconds."""
    deadline: float
    """Monotonic seconds: the sweep closes the session once this has passed."""
    created_monotonic: float
    auth_fingerprint: bytes = b""
    closed: bool = False
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    """Handler tasks of requests in flight on this session: cut when it closes."""

    @property
    def expiration(self) -> float:
        """Epoch seconds, as the wire protocol gives it."""
        return self.created_at + (self.deadline - self.created_monotonic)

    def describe(self) -> dict[str, Any]:
        """The fields `/session/get` answers with."""
        return {
            "session_id": self.session_id,
            "auth_data": self.auth_fields,
            "lifetime": self.lifetime,
            "expiration": self.expiration,
            "created_at": self.created_at,
            "on_close_route": self.on_close_route,
            "on_close_payload": self.on_close_payload,
        }

    def attach(self, task: asyncio.Task[Any]) -> None:
        """Count `task` as in flight on this session; a closed session cuts it at once."""
        if self.closed:
            task.cancel()
        else:
            self.tasks.add(task)

    def detach(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)


class SessionStore:
    """The open sessions, the ids of recently closed ones, and their close callbacks."""

    def __init__(self, config: SessionConfig, ledger: Ledger, model: ModelClient) -> None:
        self.config = config
        self.ledger = ledger
        self.model = model
        self._open: dict[str, Session] = {}
        self._closed: OrderedDict[str, None] = OrderedDict()
        self._notifications: set[asyncio.Task[None]] = set()
        self._notify_slots = asyncio.Semaphore(NOTIFY_CONCURRENCY)

    def __len__(self) -> int:
        return len(self._open)

    # --- opening and finding ------------------------------------------------------------
    def open(
        self,
        auth: AuthData,
        lifetime: float,
        on_close_route: str | None = None,
        on_close_payload: dict[str, Any] | None = None,
        auth_fields: dict[str, Any] | None = None,
    ) -> Session:
        """Open a session for `auth` (`auth_fields`: the auth_data as sent, if not `auth`)."""
        if len(self._open) >= self.config.max_sessions:
            raise SessionLimit
        if not 0 < lifetime <= self.config.max_lifetime:
            raise ValueError(f"lifetime must be in (0, {self.config.max_lifetime}] seconds")
        if on_close_route is not None:
            check_close_route(on_close_route)
        record = self.ledger.receive(auth.request_idx, SESSION_ROUTE, auth.cost)
        self.ledger.start(record)
        now = time.monotonic()
        if auth_fields is None:
            auth_fields = auth.model_dump(mode="json", exclude_none=True)
        session = Session(
            session_id=secrets.token_urlsafe(SESSION_ID_BYTES),
            auth=auth,
            auth_fields=auth_fields,
            lifetime=lifetime,
            created_at=time.time(),
            on_close_route=on_close_route,
            on_close_payload=on_close_payload,
            record=record,
            deadline=now + lifetime,
            created_monotonic=now,
            auth_fingerprint=auth_digest(auth_fields),
        )
        self._open[session.session_id] = session
        logger.debug("session opened (%d open)", len(self._open))
        return session

    def find(self, session_id: str) -> Session | None:
        return self._open.get(session_id)

    def bound(self, session_id: str, auth_fields: dict[str, Any]) -> Session | None:
        """The open session `session_id` if `auth_fields` is the auth_data it was created with.

        A client sends its session's auth_data with every request made in the session (the
        vastai client does). That auth_data was verified, and in strict mode used up, at
        `/session/create`; it stays valid for this session while the session lives, and for
        nothing else: elsewhere it goes through the signature check again (strict: 401).
        """
        session = self._open.get(session_id)
        fingerprint = auth_digest(auth_fields)
        if session is None or not hmac.compare_digest(fingerprint, session.auth_fingerprint):
            return None
        return session

    def was_closed(self, session_id: str) -> bool:
        return session_id in self._closed

    def extend(self, session_id: str) -> Session | None:
        """A request on the session: push its expiry back by its lifetime, within the bound."""
        session = self._open.get(session_id)
        if session is not None:
            ceiling = time.monotonic() + self.config.max_lifetime
            session.deadline = min(session.deadline + session.lifetime, ceiling)
        return session

    @staticmethod
    def authorized(session: Session, session_auth: object) -> bool:
        """Whether `session_auth` equals the auth_data the session was created with, exactly."""
        return hmac.compare_digest(auth_digest(session_auth), session.auth_fingerprint)

    # --- closing ------------------------------------------------------------------------
    def close(self, session: Session) -> bool:
        """Close now: cut its requests, report its request_idx, call its close route.

        False if it was closed already. The close route is called in the background.
        """
        if session.closed:
            return False
        session.closed = True
        self._open.pop(session.session_id, None)
        self._remember_closed(session.session_id)
        for task in list(session.tasks):
            task.cancel()
        self.ledger.finish(session.record, Outcome.SUCCESS, 200)
        if session.on_close_route is not None:
            task = asyncio.ensure_future(logged("session close call", self._notify(session)))
            self._notifications.add(task)
            task.add_done_callback(self._notifications.discard)
        logger.debug("session closed after %.0f s (%d open)", self._age(session), len(self._open))
        return True

    def sweep(self) -> int:
        """Close every expired session; returns how many."""
        now = time.monotonic()
        expired = [s for s in self._open.values() if s.deadline <= now]
        for session in expired:
            self.close(session)
        return len(expired)

    async def run_sweeps(self) -> None:
        """Sweep on a timer until cancelled."""
        while True:
            await asyncio.sleep(self.config.sweep_interval)
            self.sweep()

    async def close_all(self) -> None:
        """Close every session and wait for their close routes (each bounded by its timeout)."""
        for session in list(self._open.values()):
            self.close(session)
        await self.wait_notified()

    async def wait_notified(self) -> None:
        while self._notifications:
            await asyncio.gather(*self._notifications, return_exceptions=True)

    def _remember_closed(self, session_id: str) -> None:
        if self.config.remember_closed <= 0:
            return
        self._closed[session_id] = None
        while len(self._closed) > self.config.remember_closed:
            self._closed.popitem(last=False)

    @staticmethod
    def _age(session: Session) -> float:
        return time.monotonic() - session.created_monotonic

    async def _notify(self, session: Session) -> None:
        """POST the close payload plus session_id to the model server; never raises."""
        assert session.on_close_route is not None
        body = {**(session.on_close_payload or {}), "session_id": session.session_id}
        async with self._notify_slots:
            try:
                http_status = await self.model.notify(
                    session.on_close_route, orjson.dumps(body), self.config.close_timeout
                )
                if http_status >= 400:
                    logger.warning("session close route answered %d", http_status)
            except UpstreamError as error:
                logger.warning("session close route failed: %s", error.message)
            except ValueError as error:
                logger.warning("session close route failed: %s", error.__class__.__name__)
