"""Sessions end to end: the four session routes, requests on a session, the sweep, bounds."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from pyworker.config import SessionConfig
from pyworker.config.environment import Environment
from pyworker.lifecycle.accounting import Ledger, Outcome
from pyworker.protocol.auth import AuthData
from pyworker.serving.inflight import InFlight
from pyworker.serving.sessions import SESSION_ROUTE, SessionLimit, SessionStore, check_close_route
from pyworker.upstream.model import ModelClient
from tests.conftest import KeyPair, ModelServer, RunningWorker, WorkerFactory, wait_until

ROUTES = ("/session/get", "/session/health", "/session/end")
SSRF_ROUTES = [
    "http://169.254.169.254/latest/meta-data",
    "https://evil.example/x",
    "//evil/x",
    "http:/x",
    "/\\evil/x",
    "\\\\evil\\x",
    "evil/x",
    "/x#fragment",
    "/x y",
    "/x\r\nHost: evil",
    "",
    "/" + "a" * 3000,
]


async def create(
    worker: RunningWorker, keypair: KeyPair, payload: Any = None, **auth: Any
) -> tuple[str, dict[str, Any]]:
    """Open a session; returns its id and the auth_data that proves it."""
    auth_data = keypair.auth_data(**auth)
    body = {"auth_data": auth_data, "payload": {} if payload is None else payload}
    async with worker.post("/session/create", body) as response:
        assert response.status == 201, await response.text()
        answer = await response.json()
    return answer["session_id"], auth_data


async def call(worker: RunningWorker, route: str, body: Any) -> tuple[int, Any]:
    async with worker.post(route, body) as response:
        return response.status, await response.json()


# --- the round trip ----------------------------------------------------------------------
async def test_create_get_health_end(start_worker: WorkerFactory, keypair: KeyPair) -> None:
    worker = await start_worker()
    before = time.time()
    payload = {"lifetime": 120, "on_close_route": "/echo", "on_close_payload": {"k": 1}}
    session_id, auth = await create(worker, keypair, payload, request_idx=31)
    query = {"session_id": session_id, "session_auth": auth}

    status, fields = await call(worker, "/session/get", query)
    assert status == 200
    assert fields["session_id"] == session_id and fields["lifetime"] == 120
    assert fields["on_close_route"] == "/echo" and fields["on_close_payload"] == {"k": 1}
    assert fields["auth_data"]["request_idx"] == 31
    assert before + 119 <= fields["expiration"] <= time.time() + 121
    assert before - 1 <= fields["created_at"] <= time.time()

    assert await call(worker, "/session/health", query) == (200, {"ok": True})
    assert await call(worker, "/session/end", query) == (
        200,
        {"ended": True, "removed_session": session_id},
    )
    assert await call(worker, "/session/health", query) == (200, {"ok": False})
    assert await call(worker, "/session/end", query) == (410, {"error": "session already closed"})
    assert (await call(worker, "/session/get", query))[0] == 400


async def test_session_ids_are_long_random_and_url_safe(
    start_worker: WorkerFactory, keypair: KeyPair
) -> None:
    worker = await start_worker()
    ids = [(await create(worker, keypair))[0] for _ in range(20)]
    assert len(set(ids)) == 20
    for session_id in ids:
        assert re.fullmatch(r"[A-Za-z0-9_-]{32}", session_id)  # 24 bytes: 192 bits


async def test_an_open_session_counts_its_cost_as_load_and_is_reported_when_closed(
    start_worker: WorkerFactory, keypair: KeyPair
) -> None:
    worker = await start_worker()
    ledger = worker.worker.ledger
    session_id, auth = await create(worker, keypair, request_idx=900, cost=25)
    assert ledger.current_load == 25 and ledger.working_request_idxs() == [900]
    assert ledger.interval().new_load == 25
    await call(worker, "/session/end", {"session_id": session_id, "session_auth": auth})
    assert ledger.current_load == 0 and ledger.in_progress == 0
    (record,) = ledger.take_finished()
    assert (record.request_idx, record.outcome, record.route) == (900, Outcome.SUCCESS, "/session")


# --- /session/create refusals --------------------------------------------------------------
async def test_create_needs_a_valid_signature(
    start_worker: WorkerFactory, keypair: KeyPair
) -> None:
    worker = await start_worker()
    forged = KeyPair().auth_data()
    for auth in (forged, keypair.auth_data(signature="bm90IGl0")):
        async with worker.post("/session/create", {"auth_data": auth, "payload": {}}) as r:
            assert r.status == 401
    async with worker.post("/session/create", {"payload": {}}) as response:
        assert response.status == 422
        assert (await response.json())["auth_data"] == "missing parameter"
    assert len(worker.worker.sessions) == 0
    assert worker.worker.ledger.interval().received == 0


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"lifetime": "soon"}, "lifetime"),
        ({"lifetime": -1}, "lifetime"),
        ({"lifetime": 0}, "lifetime"),
        ({"lifetime": True}, "lifetime"),
        ({"lifetime": 1e300}, "lifetime"),
        ({"lifetime": 86_401}, "lifetime"),
        ({"on_close_route": 5}, "on_close_route"),
        ({"on_close_payload": [1, 2]}, "on_close_payload"),
        ({"on_close_payload": "text"}, "on_close_payload"),
        *[({"on_close_route": route}, "on_close_route") for route in SSRF_ROUTES],
    ],
)
async def test_create_refuses_bad_payloads_with_422(
    start_worker: WorkerFactory,
    keypair: KeyPair,
    model_server: ModelServer,
    payload: dict[str, Any],
    field: str,
) -> None:
    worker = await start_worker()
    body = {"auth_data": keypair.auth_data(), "payload": payload}
    async with worker.post("/session/create", body) as response:
        assert response.status == 422
        answer = await response.json()
    assert field in answer["payload"], answer
    assert len(worker.worker.sessions) == 0


async def test_create_refuses_a_payload_that_is_not_an_object(
    start_worker: WorkerFactory, keypair: KeyPair
) -> None:
    worker = await start_worker()
    for payload in ([1], "x", 3):
        body = {"auth_data": keypair.auth_data(), "payload": payload}
        async with worker.post("/session/create", body) as response:
            assert response.status == 422
            assert (await response.json())["payload"] == "must be a JSON object"


async def test_the_session_limit_is_429_and_counted_rejected(
    start_worker: WorkerFactory, keypair: KeyPair
) -> None:
    worker = await start_worker(sessions={"max_sessions": 2})
    first, auth = await create(worker, keypair)
    await create(worker, keypair)
    body = {"auth_data": keypair.auth_data(request_idx=77, cost=3), "payload": {}}
    async with worker.post("/session/create", body) as response:
        assert response.status == 429
        assert int(response.headers["Retry-After"]) >= 1
        assert (await response.json())["error"] == "too many open sessions"
    ledger = worker.worker.ledger
    assert ledger.interval().rejected_load == 3
    assert [r.request_idx for r in ledger.take_finished()] == [77]
    await call(worker, "/session/end", {"session_id": first, "session_auth": auth})
    await create(worker, keypair)


async def test_create_is_503_while_not_ready(
    start_worker: WorkerFactory, keypair: KeyPair, model_server: ModelServer
) -> None:
    model_server.recorder.healthy = False
    worker = await start_worker(
        model_server={"base_url": model_server.url, "health_path": "/health"}, wait_ready=False
    )
    await wait_until(lambda: worker.worker.verifier.has_key)
    body = {"auth_data": keypair.auth_data(), "payload": {}}
    async with worker.post("/session/create", body) as response:
        assert response.status == 503 and "Retry-After" in response.headers


# --- bad input on every route ----------------------------------------------------------------
@pytest.mark.parametrize("route", ["/session/create", *ROUTES])
@pytest.mark.parametrize("body", [b"", b"{not json", b"\xff\xfe", b"[1, 2]", b'"text"', b"null"])
async def test_unparseable_bodies_are_422(
    start_worker: WorkerFactory, route: str, body: bytes
) -> None:
    worker = await start_worker()
    async with worker.post(route, body) as response:
        assert response.status == 422
        assert "error" in await response.json()


@pytest.mark.parametrize("route", ROUTES)
async def test_missing_and_mistyped_fields_are_named(
    start_worker: WorkerFactory, keypair: KeyPair, route: str
) -> None:
    worker = await start_worker()
    status, answer = await call(worker, route, {})
    assert status == 422
    assert answer["session_id"] == answer["session_auth"] == "missing parameter"
    status, answer = await call(worker, route, {"session_id": 5, "session_auth": "x"})
    assert status == 422 and set(answer) >= {"session_id", "session_auth"}
    status, answer = await call(worker, route, {"session_id": "x" * 300, "session_auth": {}})
    assert status == 422 and "session_id" in answer


@pytest.mark.parametrize("route", ["/session/create", *ROUTES])
async def test_huge_bodies_are_413_with_and_without_content_length(
    start_worker: WorkerFactory, keypair: KeyPair, route: str
) -> None:
    worker = await start_worker()
    huge: dict[str, Any] = {"session_id": "s", "session_auth": {"pad": "z" * 70_000}}
    huge |= {"auth_data": keypair.auth_data(), "payload": {"on_close_payload": {"x": "y" * 70_000}}}
    async with worker.post(route, huge) as response:
        assert response.status == 413

    async def chunks() -> Any:
        yield b'{"session_id": "'
        for _ in range(80):
            yield b"x" * 1000
        yield b'"}'

    async with worker.post(route, chunks()) as response:
        assert response.status == 413


async def test_unknown_ids(start_worker: WorkerFactory, keypair: KeyPair) -> None:
    worker = await start_worker()
    query = {"session_id": "no-such-session", "session_auth": keypair.auth_data()}
    assert (await call(worker, "/session/get", query))[0] == 400
    assert await call(worker, "/session/health", query) == (200, {"ok": False})
    assert (await call(worker, "/session/end", query))[0] == 400


async def test_wrong_session_auth_is_401_and_leaves_the_session_open(
    start_worker: WorkerFactory, keypair: KeyPair
) -> None:
    worker = await start_worker()
    session_id, auth = await create(worker, keypair, request_idx=5)
    wrong = [
        keypair.auth_data(request_idx=6),
        {**auth, "cost": auth["cost"] + 1},
        {**auth, "signature": auth["signature"][:-4] + "AAAA"},
        {"anything": "else"},
        {},
        # Near misses: as in the reference, session_auth must be the auth_data itself.
        {**auth, "cost": str(auth["cost"])},
        {**auth, "request_idx": "5"},
        {**auth, "extra": True},
        {key: value for key, value in auth.items() if key != "endpoint"},
    ]
    for session_auth in wrong:
        query = {"session_id": session_id, "session_auth": session_auth}
        for route in ROUTES:
            status, answer = await call(worker, route, query)
            assert status == 401, (route, session_auth)
            assert answer == {"error": "session_auth is not valid"}
    assert worker.worker.sessions.find(session_id) is not None
    # The same auth_data, its keys in another order and its numbers written otherwise, proves it.
    same = dict(reversed(list({**auth, "cost": float(auth["cost"])}.items())))
    query = {"session_id": session_id, "session_auth": same}
    assert await call(worker, "/session/health", query) == (200, {"ok": True})


# --- requests on a session ----------------------------------------------------------------
async def test_a_request_on_a_session_extends_it_within_max_lifetime(
    start_worker: WorkerFactory, keypair: KeyPair
) -> None:
    worker = await start_worker(sessions={"max_lifetime": 100})
    session_id, auth = await create(worker, keypair, {"lifetime": 40})
    query = {"session_id": session_id, "session_auth": auth}
    first = (await call(worker, "/session/get", query))[1]["expiration"]
    body = {"auth_data": keypair.auth_data(), "payload": {"p": 1}, "session_id": session_id}
    async with worker.post("/echo", body) as response:
        assert response.status == 200
    second = (await call(worker, "/session/get", query))[1]["expiration"]
    assert second == pytest.approx(first + 40, abs=0.5)
    for _ in range(3):
        async with worker.post("/echo", body) as response:
            assert response.status == 200
    third = (await call(worker, "/session/get", query))[1]["expiration"]
    assert third <= time.time() + 100.5


async def test_a_request_on_a_closed_session_is_410(
    start_worker: WorkerFactory, keypair: KeyPair
) -> None:
    worker = await start_worker()
    session_id, auth = await create(worker, keypair)
    await call(worker, "/session/end", {"session_id": session_id, "session_auth": auth})
    body = {"auth_data": keypair.auth_data(), "payload": {}, "session_id": session_id}
    async with worker.post("/echo", body) as response:
        assert response.status == 410
        assert await response.json() == {"error": "invalid session"}


async def test_ending_a_session_cuts_its_requests_in_flight(
    start_worker: WorkerFactory, keypair: KeyPair, model_server: ModelServer
) -> None:
    worker = await start_worker()
    session_id, auth = await create(worker, keypair, request_idx=1)
    payload = {"chunks": 3, "hold_after_first": True}
    body = {"auth_data": keypair.auth_data(request_idx=2), "payload": payload}
    other = asyncio.create_task(_stream_status(worker, body))  # not on the session: untouched
    async with worker.post("/stream", {**body, "session_id": session_id}) as response:
        assert response.status == 200
        assert await response.content.readuntil(b"\n\n") == b"data: 0\n\n"
        await call(worker, "/session/end", {"session_id": session_id, "session_auth": auth})
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(response.read(), 5)
    await wait_until(lambda: worker.worker.ledger.in_progress == 1)
    model_server.recorder.release.set()
    assert await other == 200
    outcomes = {(r.route, r.outcome) for r in worker.worker.ledger.take_finished()}
    assert outcomes == {
        ("/session", Outcome.SUCCESS),
        ("/stream", Outcome.CANCELLED),
        ("/stream", Outcome.SUCCESS),
    }


async def test_the_sweep_closes_expired_sessions_cuts_requests_and_calls_close_route(
    start_worker: WorkerFactory, keypair: KeyPair, model_server: ModelServer
) -> None:
    worker = await start_worker(sessions={"sweep_interval": 0.05})
    payload = {"lifetime": 1.0, "on_close_route": "/echo", "on_close_payload": {"bye": 1}}
    session_id, auth = await create(worker, keypair, payload, request_idx=40)
    body = {
        "auth_data": keypair.auth_data(request_idx=41),
        "payload": {"wait_release": True},
        "session_id": session_id,
    }
    # Cut when the session expires (2 s: created for 1 s, extended by 1 s by this request).
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await asyncio.wait_for(_slow_status(worker, body), 5)
    await wait_until(lambda: {"bye": 1, "session_id": session_id} in model_server.recorder.payloads)
    await asyncio.wait_for(model_server.recorder.disconnected.wait(), 5)
    finished = {r.request_idx: r.outcome for r in worker.worker.ledger.take_finished()}
    assert finished == {40: Outcome.SUCCESS, 41: Outcome.CANCELLED}
    query = {"session_id": session_id, "session_auth": auth}
    assert (await call(worker, "/session/end", query))[0] == 410
    assert worker.worker.ledger.current_load == 0


async def test_a_hung_close_route_is_abandoned_at_its_timeout(
    start_worker: WorkerFactory, keypair: KeyPair, model_server: ModelServer
) -> None:
    worker = await start_worker(sessions={"close_timeout": 1.0})
    payload = {"on_close_route": "/slow", "on_close_payload": {"wait_release": True}}
    session_id, auth = await create(worker, keypair, payload)
    started = time.monotonic()
    status, _ = await call(worker, "/session/end", {"session_id": session_id, "session_auth": auth})
    assert status == 200 and time.monotonic() - started < 1.0  # the callback runs aside
    await asyncio.wait_for(worker.worker.sessions.wait_notified(), 5)
    assert time.monotonic() - started >= 1.0
    assert not model_server.recorder.release.is_set()  # so the model never answered


# --- the plain-HTTP side port -------------------------------------------------------------
async def test_the_side_app_serves_session_end_only(
    start_worker: WorkerFactory, keypair: KeyPair
) -> None:
    worker = await start_worker()
    session_id, auth = await create(worker, keypair)
    side = TestServer(worker.worker.create_side_app(), host="127.0.0.1")
    await side.start_server()
    try:
        url = str(side.make_url("")).rstrip("/")
        query = {"session_id": session_id, "session_auth": auth}
        async with aiohttp.ClientSession() as client:
            async with client.post(url + "/session/create", json={}) as response:
                assert response.status == 404
            async with client.post(url + "/session/end", json={**query, "session_auth": {}}) as r:
                assert r.status == 401
            async with client.post(url + "/session/end", json=query) as response:
                assert response.status == 200
                assert (await response.json())["removed_session"] == session_id
    finally:
        await side.close()
    assert worker.worker.sessions.find(session_id) is None


async def test_the_worker_process_serves_session_end_on_loopback_side_port(
    tmp_path: Path, model_server: ModelServer
) -> None:
    config = tmp_path / "worker.toml"
    config.write_text(
        f'[model_server]\nbase_url = "{model_server.url}"\n[[routes]]\npath = "/echo"\n'
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pyworker", "run", str(config), "--port", "0",
        stdout=asyncio.subprocess.PIPE,
        env=_local_environ(),
    )  # fmt: skip
    assert process.stdout is not None
    try:
        await asyncio.wait_for(process.stdout.readline(), 30)
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        match = re.search(rb"/session/end also on (http://127\.0\.0\.1:\d+)", line)
        assert match, line
        side = match.group(1).decode()
        async with aiohttp.ClientSession() as client:
            query = {"session_id": "unknown", "session_auth": {}}
            async with client.post(side + "/session/end", json=query) as response:
                assert response.status == 400
            async with client.post(side + "/echo", json={}) as response:
                assert response.status == 404
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 15)


async def test_a_taken_side_port_does_not_stop_the_worker(
    tmp_path: Path, model_server: ModelServer, keypair: KeyPair
) -> None:
    config = tmp_path / "worker.toml"
    config.write_text(
        f'[model_server]\nbase_url = "{model_server.url}"\n[[routes]]\npath = "/echo"\n'
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pyworker", "run", str(config), "--port", "0",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=_local_environ() | {"WORKER_HTTP_PORT": str(port)},
        )  # fmt: skip
        assert process.stdout is not None and process.stderr is not None
        try:
            line = await asyncio.wait_for(process.stdout.readline(), 30)
            match = re.search(rb"listening on (http://\S+)", line)
            assert match, line
            async with aiohttp.ClientSession() as client:
                body = {"auth_data": keypair.auth_data(), "payload": {}}
                url = match.group(1).decode() + "/echo"
                deadline = time.monotonic() + 15
                while True:  # 503 until ready
                    async with client.post(url, json=body) as response:
                        if response.status == 200:
                            break
                    assert time.monotonic() < deadline, response.status
                    await asyncio.sleep(0.02)
        finally:
            process.terminate()
            assert await asyncio.wait_for(process.wait(), 15) == 0
    assert f"session side port 127.0.0.1:{port} not served".encode() in await process.stderr.read()


def test_side_port_environment() -> None:
    assert Environment.from_env({}).worker_http_port == 3001
    assert Environment.from_env({"WORKER_PORT": "0"}).worker_http_port == 0
    assert Environment.from_env({"WORKER_PORT": "65535"}).worker_http_port == 0
    custom = Environment.from_env({"WORKER_HTTP_PORT": "4001", "WORKER_HTTP_HOST": "0.0.0.0"})
    assert (custom.worker_http_port, custom.worker_http_host) == (4001, "0.0.0.0")
    assert Environment.from_env({"CONTAINER_ID": "1"}).worker_http_host == "127.0.0.1"


# --- the store's bounds -------------------------------------------------------------------
@pytest.mark.parametrize("route", ["/close", "/a/b_c-d.e~f", "/v1/x:y?z=1&w=%20", "/@x", "/"])
def test_close_routes_that_stay_on_the_model_server(route: str) -> None:
    assert check_close_route(route) == route


@pytest.mark.parametrize("route", SSRF_ROUTES)
def test_close_routes_that_would_leave_it(route: str) -> None:
    with pytest.raises(ValueError, match="path on the model server"):
        check_close_route(route)


async def test_store_bounds_sessions_lifetime_and_closed_ids() -> None:
    store = SessionStore(
        SessionConfig(max_sessions=3, max_lifetime=10, remember_closed=2),
        Ledger(),
        ModelClient("http://127.0.0.1:9", 1.0),
    )
    auth = AuthData(cost=1, endpoint="e", reqnum=1, request_idx=1, signature="s", url="u")
    sessions = [store.open(auth, 6) for _ in range(3)]
    with pytest.raises(SessionLimit):
        store.open(auth, 6)
    with pytest.raises(ValueError, match="lifetime"):
        SessionStore(SessionConfig(), Ledger(), store.model).open(auth, 86_401)
    for _ in range(5):
        store.extend(sessions[0].session_id)
    assert sessions[0].deadline <= time.monotonic() + 10
    for session in sessions:
        assert store.close(session)
    assert not store.close(sessions[0])
    assert [store.was_closed(s.session_id) for s in sessions] == [False, True, True]
    assert len(store) == 0 and store.ledger.current_load == 0
    assert all(r.route == SESSION_ROUTE for r in store.ledger.take_finished())
    await store.model.close()


async def test_a_request_entering_a_closed_session_is_cut() -> None:
    store = SessionStore(SessionConfig(), Ledger(), ModelClient("http://127.0.0.1:9", 1.0))
    auth = AuthData(cost=1, endpoint="e", reqnum=1, request_idx=1, signature="s", url="u")
    session = store.open(auth, 5)
    in_flight = InFlight()

    async def request() -> None:
        in_flight.enter(session)
        try:
            await asyncio.sleep(5)
        finally:
            in_flight.leave()

    store.close(session)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(asyncio.create_task(request()), 2)
    assert len(in_flight) == 0 and await in_flight.wait_idle(0)


async def _slow_status(worker: RunningWorker, body: Any) -> int:
    async with worker.post("/slow", body) as response:
        await response.read()
        status: int = response.status
        return status


async def _stream_status(worker: RunningWorker, body: Any) -> int:
    async with worker.post("/stream", body) as response:
        await response.read()
        status: int = response.status
        return status


def _local_environ() -> dict[str, str]:
    drop = ("CONTAINER_ID", "REPORT_ADDR", "UNSECURED", "WORKER_HTTP_PORT", "WORKER_HTTP_HOST")
    return {k: v for k, v in os.environ.items() if k not in drop}
