"""One refusal, answered in one place: what the client gets, and what the ledger counts.

A handler raises `Refused`; `refusal_answers` renders it on a real socket and records only the
refusals that say they are rejected load.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDictProxy

from pyworker.lifecycle.accounting import Ledger, Outcome
from pyworker.serving import refusals
from pyworker.serving.refusals import Refused, Rejection, refusal_answers

RAISED: dict[str, Refused] = {
    "/full": refusals.gate_full("queue is full", None, Rejection(7, "/full", 2.5)),
    "/slow": refusals.gate_full(
        "estimated wait exceeds max_queue_time", math.inf, Rejection(8, "/slow", 1.0)
    ),
    "/soon": refusals.gate_full(
        "estimated wait exceeds max_queue_time", 0.2, Rejection(9, "/soon", 1.0)
    ),
    "/not-ready": refusals.not_ready("LOADING"),
    "/large": refusals.body_too_large(10),
    "/token": refusals.invalid_token(),
}


@pytest.fixture
async def served() -> AsyncIterator[tuple[str, Ledger]]:
    ledger = Ledger()
    app = web.Application(middlewares=[refusal_answers(ledger)])
    for path, refused in RAISED.items():

        async def handler(request: web.Request, refused: Refused = refused) -> web.Response:
            raise refused

        app.router.add_get(path, handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/"), ledger
    finally:
        await server.close()


async def _get(url: str) -> tuple[int, dict[str, Any], CIMultiDictProxy[str]]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.json(), response.headers


async def test_a_refusal_is_rendered_as_json_with_its_headers(
    served: tuple[str, Ledger],
) -> None:
    base, _ = served
    status, body, headers = await _get(base + "/not-ready")
    assert (status, body) == (503, {"error": "worker is not ready: LOADING", "state": "LOADING"})
    assert headers["Retry-After"] == "5"
    status, body, headers = await _get(base + "/token")
    assert (status, body, headers["WWW-Authenticate"]) == (
        401,
        {"error": "invalid token"},
        "Bearer",
    )
    status, body, headers = await _get(base + "/large")
    assert (status, body) == (413, {"error": "request body over 10 bytes"})
    assert headers["Connection"] == "close" and "Retry-After" not in headers


async def test_retry_after_is_whole_seconds_from_one_to_an_hour(
    served: tuple[str, Ledger],
) -> None:
    base, _ = served
    status, body, headers = await _get(base + "/full")
    assert (status, body, headers["Retry-After"]) == (
        429,
        {"error": "queue is full", "estimated_wait": None},
        "1",
    )
    _, body, headers = await _get(base + "/slow")
    assert headers["Retry-After"] == "3600"
    _, body, headers = await _get(base + "/soon")
    assert (headers["Retry-After"], body["estimated_wait"]) == ("1", 0.2)


async def test_only_rejected_refusals_reach_the_ledger(served: tuple[str, Ledger]) -> None:
    base, ledger = served
    for path in ("/not-ready", "/token", "/large"):
        await _get(base + path)
    assert ledger.take_finished() == []
    await _get(base + "/full")
    [record] = ledger.take_finished()
    assert (record.request_idx, record.route, record.outcome, record.status) == (
        7,
        "/full",
        Outcome.REJECTED,
        429,
    )
    assert ledger.interval().rejected_load == pytest.approx(2.5)
