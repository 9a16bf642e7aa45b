"""Routes that are Python functions in the worker's own process, behind the same request path.

Each test starts a worker (tests/conftest.py `start_worker`) whose routes are functions and
checks what the client gets and what the ledger accounts, as for a forwarded route.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import orjson
import pytest

from pyworker.config import HandlerResult
from pyworker.lifecycle.accounting import Outcome
from tests.conftest import KeyPair, RunningWorker, WorkerFactory, wait_until


def signed(keypair: KeyPair, payload: dict[str, Any], request_idx: int = 1) -> dict[str, Any]:
    return {"auth_data": keypair.auth_data(request_idx=request_idx), "payload": payload}


async def echo(payload: dict[str, Any]) -> dict[str, Any]:
    return {"echo": payload}


def shout(payload: dict[str, Any]) -> dict[str, Any]:
    return {"text": str(payload.get("text", "")).upper()}


def picture(payload: dict[str, Any]) -> HandlerResult:
    return HandlerResult(200, b"\x89PNG fake", "image/png")


def raw(payload: dict[str, Any]) -> bytes:
    return b"\x00\x01"


async def count(payload: dict[str, Any]) -> AsyncIterator[dict[str, int]]:
    for number in range(int(payload["n"])):
        yield {"n": number}


def count_in_thread(payload: dict[str, Any]) -> Iterator[str]:
    for number in range(int(payload["n"])):
        yield f"data: {number}\n\n"


def refuse(payload: dict[str, Any]) -> dict[str, Any]:
    raise ValueError("text is required")


async def broken(payload: dict[str, Any]) -> dict[str, Any]:
    raise RuntimeError("the secret payload")


def not_json(payload: dict[str, Any]) -> object:
    return object()


ROUTES = [
    {"path": "/echo", "function": echo},
    {"path": "/shout", "function": shout},
    {"path": "/picture", "function": picture},
    {"path": "/raw", "function": raw},
    {"path": "/count", "function": count},
    {"path": "/events", "function": count_in_thread, "stream_type": "text/event-stream"},
    {"path": "/refuse", "function": refuse},
    {"path": "/broken", "function": broken},
    {"path": "/not-json", "function": not_json},
]


async def post(worker: RunningWorker, path: str, body: dict[str, Any]) -> tuple[int, str, bytes]:
    async with worker.post(path, body) as answer:
        return answer.status, answer.content_type, await answer.read()


async def test_a_function_answers_json_bytes_and_its_own_content_type(
    start_worker: WorkerFactory, keypair: KeyPair
) -> None:
    worker = await start_worker(routes=ROUTES)
    status, kind, body = await post(worker, "/echo", signed(keypair, {"a": [1, 2]}))
    assert (status, kind, orjson.loads(body)) == (200, "application/json", {"echo": {"a": [1, 2]}})
    status, kind, body = await post(worker, "/shout", signed(keypair, {"text": "hi"}))
    assert (status, orjson.loads(body)) == (200, {"text": "HI"})
    assert await post(worker, "/picture", signed(keypair, {})) == (
        200,
        "image/png",
        b"\x89PNG fake",
    )
    assert await post(worker, "/raw", signed(keypair, {})) == (
        200,
        "application/octet-stream",
        b"\x00\x01",
    )


async def test_a_function_streams_its_chunks(start_worker: WorkerFactory, keypair: KeyPair) -> None:
    worker = await start_worker(routes=ROUTES)
    status, kind, body = await post(worker, "/count", signed(keypair, {"n": 3}))
    assert (status, kind) == (200, "application/x-ndjson")
    assert body == b'{"n":0}\n{"n":1}\n{"n":2}\n'
    status, kind, body = await post(worker, "/events", signed(keypair, {"n": 2}))
    assert (status, kind, body) == (200, "text/event-stream", b"data: 0\n\ndata: 1\n\n")


async def test_a_failing_function_is_a_clear_error_and_the_worker_serves_on(
    start_worker: WorkerFactory, keypair: KeyPair
) -> None:
    worker = await start_worker(routes=ROUTES)
    status, _, body = await post(worker, "/refuse", signed(keypair, {}))
    assert status == 422 and b"text is required" in body
    status, _, body = await post(worker, "/broken", signed(keypair, {}))
    assert status == 500 and b"RuntimeError" in body and b"secret" not in body
    status, _, body = await post(worker, "/not-json", signed(keypair, {}))
    assert status == 500 and b"not JSON" in body
    status, _, _ = await post(worker, "/echo", signed(keypair, {}))
    assert status == 200


async def test_a_function_route_is_signed_and_accounted(
    start_worker: WorkerFactory, keypair: KeyPair
) -> None:
    worker = await start_worker(routes=ROUTES)
    unsigned = {"auth_data": {**keypair.auth_data(), "signature": "AAAA"}, "payload": {}}
    assert (await post(worker, "/echo", unsigned))[0] == 401
    await post(worker, "/echo", signed(keypair, {}, request_idx=7))
    finished = worker.worker.ledger.take_finished()
    assert [(item.request_idx, item.outcome) for item in finished] == [(7, Outcome.SUCCESS)]


async def test_a_fifo_function_route_queues_then_refuses_with_429(
    start_worker: WorkerFactory, keypair: KeyPair
) -> None:
    release = asyncio.Event()
    started = asyncio.Event()

    async def hold(payload: dict[str, Any]) -> dict[str, Any]:
        started.set()
        await release.wait()
        return {}

    worker = await start_worker(
        routes=[{"path": "/hold", "function": hold, "fifo": True, "max_queue": 0}]
    )
    first = asyncio.create_task(post(worker, "/hold", signed(keypair, {}, request_idx=1)))
    await started.wait()
    assert (await post(worker, "/hold", signed(keypair, {}, request_idx=2)))[0] == 429
    release.set()
    assert (await first)[0] == 200


async def test_a_sync_cpu_bound_function_leaves_health_and_other_routes_answering(
    start_worker: WorkerFactory, keypair: KeyPair
) -> None:
    running = threading.Event()
    stop = threading.Event()

    def spin(payload: dict[str, Any]) -> dict[str, Any]:
        running.set()
        total = 0
        while not stop.is_set():  # pure Python: holds the GIL as much as it can
            total += 1
        return {"spun": total > 0}

    worker = await start_worker(routes=[{"path": "/spin", "function": spin}, *ROUTES])
    spinning = asyncio.create_task(post(worker, "/spin", signed(keypair, {})))
    try:
        assert await asyncio.to_thread(running.wait, 10)
        async with worker.session.get(worker.url + "/health") as health:
            assert health.status == 200
        assert (await post(worker, "/echo", signed(keypair, {}, request_idx=2)))[0] == 200
        assert not spinning.done()  # both answered while the function was known to run
    finally:
        stop.set()
    status, _, body = await spinning
    assert (status, orjson.loads(body)) == (200, {"spun": True})


async def test_a_client_hang_up_cancels_an_async_function(
    start_worker: WorkerFactory, keypair: KeyPair
) -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def forever(payload: dict[str, Any]) -> AsyncIterator[bytes]:
        try:
            yield b"first\n"
            started.set()
            await asyncio.Event().wait()
            yield b"never\n"
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def wait(payload: dict[str, Any]) -> dict[str, Any]:
        try:
            started.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return {}

    for function in (forever, wait):
        started.clear()
        cancelled.clear()
        worker = await start_worker(routes=[{"path": "/slow", "function": function}])
        request = asyncio.create_task(post(worker, "/slow", signed(keypair, {}, request_idx=3)))
        await started.wait()
        request.cancel()  # the client leaves
        with pytest.raises(asyncio.CancelledError):
            await request
        await asyncio.wait_for(cancelled.wait(), 10)
        ledger = worker.worker.ledger
        await wait_until(lambda: ledger.in_progress == 0)  # noqa: B023 (awaited here)
        assert [item.outcome for item in ledger.take_finished()] == [Outcome.CANCELLED]


async def test_a_cut_sync_function_keeps_its_fifo_slot_until_its_thread_ends(
    start_worker: WorkerFactory, keypair: KeyPair
) -> None:
    running = threading.Event()
    release = threading.Event()

    def hold(payload: dict[str, Any]) -> dict[str, Any]:
        running.set()
        release.wait(30)
        return {}

    route = {"path": "/hold", "function": hold, "fifo": True, "max_queue": 0}
    worker = await start_worker(routes=[route])
    first = asyncio.create_task(post(worker, "/hold", signed(keypair, {}, request_idx=1)))
    try:
        assert await asyncio.to_thread(running.wait, 10)
        assert worker.worker.in_flight.cancel_all() == 1  # cut, as a drain's grace ends
        # The thread cannot stop: one at a time still holds, so the next is refused.
        second = post(worker, "/hold", signed(keypair, {}, request_idx=2))
        assert (await asyncio.wait_for(second, 10))[0] == 429
    finally:
        release.set()
    with pytest.raises(aiohttp.ClientError):
        await first
    ledger = worker.worker.ledger
    await wait_until(lambda: ledger.in_progress == 0)
    outcomes = {item.request_idx: item.outcome for item in ledger.take_finished()}
    assert outcomes == {1: Outcome.CANCELLED, 2: Outcome.REJECTED}


async def test_a_sync_function_past_read_timeout_is_a_504_at_once(
    start_worker: WorkerFactory, keypair: KeyPair
) -> None:
    release = threading.Event()
    ended = threading.Event()

    def hold(payload: dict[str, Any]) -> dict[str, Any]:
        release.wait(30)
        ended.set()
        return {}

    worker = await start_worker(routes=[{"path": "/hold", "function": hold, "read_timeout": 0.2}])
    try:
        status, _, body = await post(worker, "/hold", signed(keypair, {}))
        assert status == 504 and b"took over 0.2 s" in body
        assert not ended.is_set()  # answered while the function still ran
    finally:
        release.set()


async def test_ending_a_session_cancels_its_function_in_flight(
    start_worker: WorkerFactory, keypair: KeyPair
) -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def words(payload: dict[str, Any]) -> AsyncIterator[bytes]:
        yield b"first\n"
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        yield b"never\n"

    worker = await start_worker(routes=[{"path": "/words", "function": words}])
    create = {"auth_data": keypair.auth_data(request_idx=1), "payload": {}}
    async with worker.post("/session/create", create) as created:
        assert created.status == 201
        session = await created.json()
    body = {**signed(keypair, {}, request_idx=2), "session_id": session["session_id"]}
    async with worker.post("/words", body) as answer:
        assert answer.status == 200
        assert await answer.content.readline() == b"first\n"
        await started.wait()
        end = {"session_id": session["session_id"], "session_auth": create["auth_data"]}
        async with worker.post("/session/end", end) as ended:
            assert ended.status == 200
        await asyncio.wait_for(cancelled.wait(), 10)
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(answer.read(), 5)
    await wait_until(lambda: worker.worker.ledger.in_progress == 0)
    outcomes = {(r.route, r.outcome) for r in worker.worker.ledger.take_finished()}
    assert outcomes == {("/session", Outcome.SUCCESS), ("/words", Outcome.CANCELLED)}
