"""The request path end to end: a worker and a fake model server on loopback sockets."""

from __future__ import annotations

import asyncio
import gzip
import socket
from typing import Any

import aiohttp
import pytest

from pyworker.lifecycle.accounting import Outcome
from pyworker.lifecycle.state import WorkerState
from tests.conftest import KeyPair, ModelServer, RunningWorker, WorkerFactory, wait_until


def envelope(keypair: KeyPair, payload: Any = None, **auth: Any) -> dict[str, Any]:
    return {"auth_data": keypair.auth_data(**auth), "payload": payload or {"prompt": "hi"}}


async def test_forwards_payload_and_relays_answer(
    start_worker: WorkerFactory, keypair: KeyPair, model_server: ModelServer
) -> None:
    worker = await start_worker()
    payload = {"prompt": "héllo ☃", "max_tokens": 5}
    async with worker.post("/echo", envelope(keypair, payload)) as response:
        assert response.status == 200
        assert await response.json() == {"received": payload}
        assert response.headers["Content-Type"].startswith("application/json")
    assert model_server.recorder.payloads == [payload]
    assert model_server.recorder.headers[0]["Accept-Encoding"] == "identity"


async def test_health_checks_and_requests_share_connections_to_the_model_server(
    start_worker: WorkerFactory, keypair: KeyPair, model_server: ModelServer
) -> None:
    # Model servers with a thread per connection (llama.cpp) run out of threads when a
    # worker keeps idle connections in more than one pool.
    worker = await start_worker(
        model_server={"base_url": model_server.url, "health_path": "/health"}
    )
    for _ in range(3):
        async with worker.post("/echo", envelope(keypair)) as response:
            assert response.status == 200
    assert len(model_server.recorder.clients) == 1


async def test_compressed_answer_is_relayed_byte_for_byte(
    start_worker: WorkerFactory, keypair: KeyPair
) -> None:
    worker = await start_worker()
    async with worker.post("/compressed", envelope(keypair), auto_decompress=False) as response:
        raw = await response.read()
        assert response.headers["Content-Encoding"] == "gzip"
        assert int(response.headers["Content-Length"]) == len(raw)
    assert gzip.decompress(raw) == b'{"zipped": true}'


async def test_model_server_status_passes_through_and_counts_as_error(
    start_worker: WorkerFactory, keypair: KeyPair
) -> None:
    worker = await start_worker()
    async with worker.post("/echo", envelope(keypair, {"status": 418})) as response:
        assert response.status == 418
    finished = worker.worker.ledger.take_finished()
    assert [(r.outcome, r.status) for r in finished] == [(Outcome.ERROR, 418)]


async def test_success_is_accounted_with_times_and_request_idx(
    start_worker: WorkerFactory, keypair: KeyPair
) -> None:
    worker = await start_worker()
    async with worker.post("/slow", envelope(keypair, request_idx=77, cost=12.5)) as response:
        assert response.status == 200
    ledger = worker.worker.ledger
    interval = ledger.interval()
    assert interval.new_load == 12.5 and interval.served_load == 12.5 and interval.received == 1
    (record,) = ledger.take_finished()
    wire = record.finished_item().to_wire()
    assert wire["request_idx"] == 77 and wire["status"] == "Success" and wire["success"] is True
    assert wire["entered_queue_at"] <= wire["work_started_at"] <= wire["work_completed_at"]
    assert ledger.in_progress == 0 and ledger.current_load == 0


# --- 413 and 422 -------------------------------------------------------------------------
async def test_body_over_limit_is_413_with_and_without_content_length(
    start_worker: WorkerFactory, keypair: KeyPair
) -> None:
    worker = await start_worker(max_body_size=4096)
    big = envelope(keypair, {"prompt": "x" * 10_000})
    async with worker.post("/echo", big) as response:
        assert response.status == 413
        assert "4096" in (await response.json())["error"]

    async def chunks() -> Any:
        yield b'{"payload": {"prompt": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}}'

    async with worker.post("/echo", chunks()) as response:
        assert response.status == 413
    async with worker.post("/echo", envelope(keypair)) as response:
        assert response.status == 200


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"", "request body is empty: expected a JSON object"),
        (b"{not json", None),
        (b"[1, 2]", "request body must be a JSON object"),
        (b'"text"', "request body must be a JSON object"),
    ],
)
async def test_unparseable_bodies_are_422(
    start_worker: WorkerFactory, body: bytes, expected: str | None
) -> None:
    worker = await start_worker()
    async with worker.post("/echo", body) as response:
        assert response.status == 422
        error = (await response.json())["error"]
        if expected:
            assert error == expected
        else:
            assert error.startswith("request body is not valid JSON")


async def test_a_model_request_sent_straight_to_the_worker_gets_a_hint(
    start_worker: WorkerFactory, model_server: ModelServer
) -> None:
    worker = await start_worker()
    openai = {"model": "m", "prompt": "hello", "max_tokens": 5}
    async with worker.post("/echo", openai) as response:
        assert response.status == 422
        answer = await response.json()
    # The reference's shape, each field named, plus what to do.
    assert answer["error"] == "invalid request"
    assert answer["auth_data"] == answer["payload"] == "missing parameter"
    assert "/route/" in answer["hint"] and "pyworker call" in answer["hint"]
    assert model_server.recorder.payloads == []  # nothing reached the model
    # A body with one of the two fields is a client that knows the envelope: no hint.
    async with worker.post("/echo", {"payload": openai}) as response:
        assert "hint" not in await response.json()


async def test_each_bad_field_is_named(start_worker: WorkerFactory, keypair: KeyPair) -> None:
    worker = await start_worker()
    auth = keypair.auth_data()
    del auth["reqnum"]
    auth["cost"] = "lots"
    body = {"auth_data": auth, "payload": [1, 2], "session_id": 5}
    async with worker.post("/echo", body) as response:
        assert response.status == 422
        answer = await response.json()
    assert answer["auth_data"]["reqnum"] == "missing parameter"
    assert "cost" in answer["auth_data"]
    assert answer["payload"] == "must be a JSON object"
    assert answer["session_id"] == "must be a string or null"

    async with worker.post("/echo", {"payload": {}}) as response:
        assert (await response.json())["auth_data"] == "missing parameter"
    async with worker.post("/echo", {"auth_data": keypair.auth_data()}) as response:
        assert (await response.json())["payload"] == "missing parameter"
    async with worker.post("/echo", envelope(keypair, reqnum="seven")) as response:
        assert response.status == 422
        assert "reqnum" in (await response.json())["auth_data"]
    async with worker.post("/echo", envelope(keypair, cost=-1)) as response:
        assert response.status == 422


async def test_numbers_sent_as_strings_are_accepted(
    start_worker: WorkerFactory, keypair: KeyPair
) -> None:
    worker = await start_worker()
    body = envelope(keypair, cost="12.5", reqnum="7", request_idx="9")
    async with worker.post("/slow", body) as response:
        assert response.status == 200
    (record,) = worker.worker.ledger.take_finished()
    assert record.workload == 12.5 and record.request_idx == 9


# --- 401 -----------------------------------------------------------------------------------
async def test_bad_signatures_are_401_and_leave_no_trace(
    start_worker: WorkerFactory, keypair: KeyPair, model_server: ModelServer
) -> None:
    worker = await start_worker()
    forged = keypair.auth_data(url="http://evil:1")
    forged["url"] = "http://127.0.0.1:1"  # signature of another url
    garbage = keypair.auth_data(signature="not base64 !!")
    other_key = KeyPair().auth_data()
    for auth in (forged, garbage, other_key):
        async with worker.post("/echo", {"auth_data": auth, "payload": {}}) as response:
            assert response.status == 401
            assert (await response.json())["error"] == "invalid signature"
    ledger = worker.worker.ledger
    assert ledger.interval().received == 0 and ledger.finished_waiting == 0
    assert ledger.interval().rejected_load == 0
    assert model_server.recorder.payloads == []


async def test_request_hook_runs_only_after_the_signature_check(
    start_worker: WorkerFactory, keypair: KeyPair, model_server: ModelServer
) -> None:
    seen: list[dict[str, Any]] = []

    def hook(payload: dict[str, Any]) -> dict[str, Any]:
        seen.append(payload)
        if "bad" in payload:
            raise ValueError("bad is not allowed")
        return {**payload, "added": True}

    worker = await start_worker(routes=[{"path": "/echo", "request_hook": hook}])
    bad_auth = keypair.auth_data(signature=KeyPair().sign("http://127.0.0.1:1"))
    async with worker.post("/echo", {"auth_data": bad_auth, "payload": {"a": 1}}) as response:
        assert response.status == 401
    assert seen == []
    async with worker.post("/echo", envelope(keypair, {"a": 1})) as response:
        assert response.status == 200
    assert model_server.recorder.payloads == [{"a": 1, "added": True}]
    async with worker.post("/echo", envelope(keypair, {"bad": 1})) as response:
        assert response.status == 422
        assert "bad is not allowed" in (await response.json())["error"]


async def test_a_crashing_request_hook_is_a_json_500_and_the_worker_keeps_serving(
    start_worker: WorkerFactory, keypair: KeyPair
) -> None:
    def hook(payload: dict[str, Any]) -> dict[str, Any]:
        if payload.get("crash"):
            raise KeyError("oops")
        return payload

    worker = await start_worker(routes=[{"path": "/echo", "request_hook": hook}])
    async with worker.post("/echo", envelope(keypair, {"crash": True})) as response:
        assert response.status == 500
        assert await response.json() == {"error": "the worker's request hook failed"}
    assert worker.worker.ledger.interval().received == 0
    async with worker.post("/echo", envelope(keypair, {"fine": True})) as response:
        assert response.status == 200


async def test_unknown_session_is_410(start_worker: WorkerFactory, keypair: KeyPair) -> None:
    worker = await start_worker()
    body = {**envelope(keypair), "session_id": "nope"}
    async with worker.post("/echo", body) as response:
        assert response.status == 410
        assert await response.json() == {"error": "invalid session"}


# --- 503 -----------------------------------------------------------------------------------
async def test_not_ready_is_503_with_retry_after(
    start_worker: WorkerFactory, keypair: KeyPair, model_server: ModelServer
) -> None:
    model_server.recorder.healthy = False
    worker = await start_worker(
        model_server={"base_url": model_server.url, "health_path": "/health"}, wait_ready=False
    )
    # past the GPU check, waiting for the model server's health
    await wait_until(lambda: worker.worker.status.state is WorkerState.LOADING)
    await wait_until(lambda: worker.worker.verifier.has_key)
    async with worker.post("/echo", envelope(keypair)) as response:
        assert response.status == 503
        assert int(response.headers["Retry-After"]) >= 1
        assert (await response.json())["state"] == "loading"
    model_server.recorder.healthy = True
    await wait_until(lambda: worker.worker.status.ready)
    async with worker.post("/echo", envelope(keypair)) as response:
        assert response.status == 200
    assert worker.worker.status.loadtime > 0


# --- admission -----------------------------------------------------------------------------
async def test_fifo_route_serves_one_at_a_time_in_arrival_order(
    start_worker: WorkerFactory, keypair: KeyPair, model_server: ModelServer
) -> None:
    worker = await start_worker(routes=[{"path": "/slow", "fifo": True}])
    gate = worker.worker.gates["/slow"]
    tasks = []
    for n in range(8):
        body = envelope(keypair, {"n": n, "wait_release": n == 0}, request_idx=n)
        tasks.append(asyncio.create_task(_status(worker, "/slow", body)))
        await wait_until(lambda n=n: gate.active + gate.waiting == n + 1)  # type: ignore[misc]
    model_server.recorder.release.set()
    assert await asyncio.gather(*tasks) == [200] * 8
    assert model_server.recorder.order == list(range(8))
    assert model_server.recorder.peak_active == 1


async def test_parallel_route_respects_its_concurrency_limit(
    start_worker: WorkerFactory, keypair: KeyPair, model_server: ModelServer
) -> None:
    worker = await start_worker(routes=[{"path": "/slow", "max_concurrency": 3}])
    bodies = [envelope(keypair, {"n": n, "seconds": 0.05}) for n in range(12)]
    statuses = await asyncio.gather(*(_status(worker, "/slow", b) for b in bodies))
    assert statuses == [200] * 12
    assert model_server.recorder.peak_active == 3


async def test_estimated_wait_over_max_queue_time_is_429_and_reported_rejected(
    start_worker: WorkerFactory, keypair: KeyPair, model_server: ModelServer
) -> None:
    worker = await start_worker(
        routes=[{"path": "/slow", "fifo": True, "max_queue_time": 1.0, "workload": "cost"}],
        perf=10.0,
    )
    first = asyncio.create_task(
        _status(worker, "/slow", envelope(keypair, {"wait_release": True}, cost=20))
    )
    await wait_until(lambda: model_server.recorder.active == 1)
    async with worker.post("/slow", envelope(keypair, request_idx=5, cost=1)) as response:
        assert response.status == 429
        answer = await response.json()
        assert answer["estimated_wait"] == pytest.approx(2.0)
        assert int(response.headers["Retry-After"]) >= 1
    model_server.recorder.release.set()
    assert await first == 200
    interval = worker.worker.ledger.interval()
    assert interval.rejected_load == 1 and interval.new_load == 20
    outcomes = {r.request_idx: r.outcome for r in worker.worker.ledger.take_finished()}
    assert outcomes[5] is Outcome.REJECTED


async def test_full_queue_is_429(
    start_worker: WorkerFactory, keypair: KeyPair, model_server: ModelServer
) -> None:
    worker = await start_worker(routes=[{"path": "/slow", "fifo": True, "max_queue": 1}])
    gate = worker.worker.gates["/slow"]
    hold = envelope(keypair, {"wait_release": True})
    tasks = [asyncio.create_task(_status(worker, "/slow", hold))]
    await wait_until(lambda: gate.active == 1)
    tasks.append(asyncio.create_task(_status(worker, "/slow", envelope(keypair))))
    await wait_until(lambda: gate.waiting == 1)
    async with worker.post("/slow", envelope(keypair)) as response:
        assert response.status == 429
        assert (await response.json())["error"] == "queue is full"
    model_server.recorder.release.set()
    assert await asyncio.gather(*tasks) == [200, 200]


# --- streaming and hang-ups ------------------------------------------------------------------
async def test_stream_chunks_reach_the_client_before_the_model_finishes(
    start_worker: WorkerFactory, keypair: KeyPair, model_server: ModelServer
) -> None:
    worker = await start_worker()
    body = envelope(keypair, {"chunks": 3, "hold_after_first": True})
    async with worker.post("/stream", body) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        first = await asyncio.wait_for(response.content.readuntil(b"\n\n"), 5)
        assert first == b"data: 0\n\n"
        assert not model_server.recorder.release.is_set()
        model_server.recorder.release.set()
        rest = await response.content.read()
    assert rest == b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n"


@pytest.mark.parametrize("path", ["/slow", "/stream"])
async def test_client_hang_up_cancels_upstream_and_counts_cancelled(
    start_worker: WorkerFactory, keypair: KeyPair, model_server: ModelServer, path: str
) -> None:
    worker = await start_worker()
    payload = {"wait_release": True, "hold_after_first": True, "chunks": 3}
    session = aiohttp.ClientSession()
    task = asyncio.create_task(
        session.post(worker.url + path, json=envelope(keypair, payload, request_idx=3))
    )
    await wait_until(lambda: worker.worker.ledger.in_progress == 1)
    await wait_until(lambda: len(model_server.recorder.payloads) == 1)
    task.cancel()
    await session.close()
    await asyncio.wait_for(model_server.recorder.disconnected.wait(), 5)
    await wait_until(lambda: worker.worker.ledger.in_progress == 0)
    (record,) = worker.worker.ledger.take_finished()
    assert record.outcome is Outcome.CANCELLED and record.request_idx == 3
    assert worker.worker.ledger.interval().new_load == 0
    async with worker.post("/echo", envelope(keypair)) as response:
        assert response.status == 200


async def test_hang_up_while_queued_frees_the_place(
    start_worker: WorkerFactory, keypair: KeyPair, model_server: ModelServer
) -> None:
    worker = await start_worker(routes=[{"path": "/slow", "fifo": True}])
    gate = worker.worker.gates["/slow"]
    first = asyncio.create_task(_status(worker, "/slow", envelope(keypair, {"wait_release": True})))
    await wait_until(lambda: gate.active == 1)
    session = aiohttp.ClientSession()
    queued = asyncio.create_task(session.post(worker.url + "/slow", json=envelope(keypair)))
    await wait_until(lambda: gate.waiting == 1)
    queued.cancel()
    await session.close()
    await wait_until(lambda: gate.waiting == 0)
    model_server.recorder.release.set()
    assert await first == 200
    assert await _status(worker, "/slow", envelope(keypair)) == 200
    outcomes = sorted(str(r.outcome) for r in worker.worker.ledger.take_finished())
    assert outcomes == ["Cancelled", "Success", "Success"]


async def test_model_dying_mid_stream_cuts_the_client_and_counts_error(
    start_worker: WorkerFactory, keypair: KeyPair
) -> None:
    worker = await start_worker()
    async with worker.post("/stream", envelope(keypair, {"chunks": 2, "die": True})) as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    await wait_until(lambda: worker.worker.ledger.finished_waiting == 1)
    (record,) = worker.worker.ledger.take_finished()
    assert record.outcome is Outcome.ERROR and record.status == 502


# --- model server faults -------------------------------------------------------------------
async def test_unreachable_model_server_is_502(
    start_worker: WorkerFactory, keypair: KeyPair, refused_port: int
) -> None:
    worker = await start_worker(model_server={"base_url": f"http://127.0.0.1:{refused_port}"})
    async with worker.post("/echo", envelope(keypair)) as response:
        assert response.status == 502
        assert (await response.json())["error"].startswith("model server unreachable")
    assert worker.worker.ledger.take_finished()[0].outcome is Outcome.ERROR


async def test_read_timeout_is_504_but_a_slow_stream_is_not(
    start_worker: WorkerFactory, keypair: KeyPair
) -> None:
    worker = await start_worker(
        routes=[{"path": "/slow", "read_timeout": 1.0}, {"path": "/stream", "read_timeout": 1.0}]
    )
    async with worker.post("/slow", envelope(keypair, {"seconds": 5})) as response:
        assert response.status == 504
        assert await response.json() == {"error": "model server timed out"}
    # Six chunks 0.25 s apart: 1.5 s in all, but never 1 s of silence (a margin that a loaded
    # machine's scheduling does not eat, as it did 0.15 s against 0.3 s).
    async with worker.post("/stream", envelope(keypair, {"chunks": 6, "interval": 0.25})) as r:
        assert r.status == 200
        assert (await r.read()).endswith(b"data: [DONE]\n\n")


async def test_connect_timeout_is_502(start_worker: WorkerFactory, keypair: KeyPair) -> None:
    # A listener whose backlog is full and never accepts: SYNs are dropped, connect hangs.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    try:
        worker = await start_worker(
            model_server={"base_url": f"http://127.0.0.1:{port}", "connect_timeout": 0.3}
        )
        async with worker.post("/echo", envelope(keypair)) as response:
            assert response.status == 502
            assert "connect timed out" in (await response.json())["error"]
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def test_a_thousand_concurrent_requests(
    start_worker: WorkerFactory, keypair: KeyPair, model_server: ModelServer
) -> None:
    worker = await start_worker()
    bodies = [envelope(keypair, {"wait_release": True}, request_idx=n) for n in range(1000)]
    tasks = [asyncio.create_task(_status(worker, "/slow", b)) for b in bodies]
    # All thousand are at the model at the same time: no pool cap serialises them.
    await wait_until(lambda: model_server.recorder.active == 1000, timeout=60)
    assert worker.worker.ledger.in_progress == 1000
    model_server.recorder.release.set()
    assert await asyncio.gather(*tasks) == [200] * 1000
    assert len(worker.worker.ledger.take_finished(limit=2000)) == 1000


async def test_bad_input_does_not_disturb_other_clients(
    start_worker: WorkerFactory, keypair: KeyPair
) -> None:
    worker = await start_worker()
    good = [_status(worker, "/slow", envelope(keypair, {"seconds": 0.2})) for _ in range(20)]
    bad = [_status(worker, "/slow", b"\xff\xfe garbage") for _ in range(20)]
    statuses = await asyncio.gather(*good, *bad)
    assert statuses == [200] * 20 + [422] * 20


async def _status(worker: RunningWorker, path: str, body: Any) -> int:
    async with worker.post(path, body) as response:
        await response.read()
        status: int = response.status
        return status
