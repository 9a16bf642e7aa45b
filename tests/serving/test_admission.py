"""One admission: a route of the config and `/session/create` answer bad input alike.

Both are admitted by pyworker.serving.admission, so the same bad request gets the same status,
body and Retry-After from each, in the same order of checks (413, 422, 401, 503).
"""

from __future__ import annotations

from typing import Any

import pytest

from pyworker.lifecycle.state import LifecycleEvent
from tests.conftest import KeyPair, RunningWorker, WorkerFactory

LIMIT = 4096
SIGNED_ROUTES = ("/echo", "/session/create")


async def _answers(
    worker: RunningWorker, paths: tuple[str, ...], body: Any
) -> list[tuple[int, bytes, str | None]]:
    answers = []
    for path in paths:
        async with worker.post(path, body) as response:
            answers.append(
                (response.status, await response.read(), response.headers.get("Retry-After"))
            )
    return answers


@pytest.fixture
async def worker(start_worker: WorkerFactory) -> RunningWorker:
    return await start_worker(max_body_size=LIMIT, sessions={"max_body_size": LIMIT})


async def test_a_body_over_the_limit_is_413_on_every_route(
    worker: RunningWorker, keypair: KeyPair
) -> None:
    body = {"auth_data": keypair.auth_data(), "payload": {"x": "a" * LIMIT}}
    answers = await _answers(worker, (*SIGNED_ROUTES, "/session/get"), body)
    assert {status for status, _, _ in answers} == {413}
    assert len(set(answers)) == 1, answers


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        {"payload": {}},
        {"auth_data": {"cost": True}, "payload": []},
        {"auth_data": {}, "payload": {}, "session_id": 7},
    ],
)
async def test_a_bad_envelope_is_the_same_422(worker: RunningWorker, body: Any) -> None:
    answers = await _answers(worker, SIGNED_ROUTES, body)
    assert answers[0][0] == 422 and answers[0] == answers[1], answers


async def test_a_bad_signature_is_the_same_401_before_readiness(
    worker: RunningWorker, keypair: KeyPair
) -> None:
    forged = keypair.auth_data(signature=KeyPair().sign("http://127.0.0.1:1"))
    worker.worker.status.handle(LifecycleEvent.DRAIN_REQUESTED)  # 401 comes before 503
    answers = await _answers(worker, SIGNED_ROUTES, {"auth_data": forged, "payload": {}})
    assert answers[0][0] == 401 and answers[0] == answers[1], answers


async def test_a_worker_that_is_not_ready_answers_the_same_503(
    worker: RunningWorker, keypair: KeyPair
) -> None:
    worker.worker.status.handle(LifecycleEvent.DRAIN_REQUESTED)
    body = {"auth_data": keypair.auth_data(), "payload": {}}
    answers = await _answers(worker, SIGNED_ROUTES, body)
    assert answers[0][0] == 503 and answers[0] == answers[1], answers
    assert answers[0][2] is not None  # Retry-After
    assert worker.worker.ledger.in_progress == 0 and not worker.worker.ledger.take_finished()
