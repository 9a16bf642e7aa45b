"""Hostile clients: numbers at and past their limits, huge workloads, deep nesting, bytes that
are not UTF-8, requests aiohttp cannot parse, session_auth near misses, payloads a re-encoding
would change.

The worker runs as in production (`JsonErrorRunner`, real sockets on loopback) in front of a
model server that records the exact bytes it receives, and reports to a recording autoscaler.
Each test checks what the client sees (status and JSON body), what the model server received,
what the autoscaler received (no null, inf, NaN or negative load, every request_idx in range,
the reporter still alive), and that the worker then still serves a valid request.
"""

from __future__ import annotations

import asyncio
import json
import math
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from pyworker.config import WorkerConfig
from pyworker.config.environment import Environment
from pyworker.protocol.auth import (
    MAX_INDEX,
    MAX_URL,
    SignatureVerifier,
    _cached_address,
    worker_address,
)
from pyworker.protocol.depth import TOO_DEEP
from pyworker.protocol.passthrough import MAX_DEPTH
from pyworker.protocol.workload import MAX_WORKLOAD
from pyworker.serving.compose import Worker, compose_worker
from pyworker.serving.http_errors import JsonErrorRunner
from pyworker.serving.server import RUNNER_OPTIONS
from tests.conftest import KeyPair, wait_until
from tests.support.fake_autoscaler import FakeAutoscaler

TOKEN = "hostile-master-token"
MAX_BODY = 256 * 1024
LOAD_FIELDS = ("cur_load", "new_load", "rej_load", "cur_perf", "max_perf")


def heavy(payload: dict[str, Any]) -> float:
    """A workload function that reads a client number: it can overflow to inf."""
    return float(payload.get("n", 1)) * 1e300


def add_marker(payload: dict[str, Any]) -> dict[str, Any]:
    return {**payload, "hooked": True}


def unwrap_input(payload: dict[str, Any]) -> dict[str, Any]:
    """Like the openai worker's hook: `{"input": {...}}` is unwrapped, anything else kept."""
    inner = payload.get("input")
    return inner if isinstance(inner, dict) else payload


def mark_in_place(payload: dict[str, Any]) -> dict[str, Any]:
    payload["marked"] = 1
    return payload


@dataclass
class ModelServer:
    """Records every request as (path, exact body bytes); answers `{"ok": true}`."""

    received: list[tuple[str, bytes]] = field(default_factory=list)

    def app(self) -> web.Application:
        async def record(request: web.Request) -> web.Response:
            self.received.append((request.path, await request.read()))
            return web.json_response({"ok": True})

        async def health(request: web.Request) -> web.Response:
            return web.json_response({"ok": True})

        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/health", health)
        app.router.add_post("/{tail:.*}", record)
        return app

    def bodies(self, path: str) -> list[bytes]:
        return [body for seen, body in self.received if seen == path]


class Hostile:
    """The worker under attack, its model server and its autoscaler."""

    def __init__(self, keypair: KeyPair) -> None:
        self.keypair = keypair
        self.model = ModelServer()
        self.autoscaler = FakeAutoscaler(keypair.pem)
        self.runners: list[web.AppRunner] = []
        self.session: aiohttp.ClientSession | None = None
        self.worker: Worker | None = None
        self.port = 0
        self.next_idx = 1000

    async def start(self) -> None:
        await self.autoscaler.start()
        model_url = await self._serve(web.AppRunner(self.model.app()))
        config = WorkerConfig.model_validate(
            {
                "model_server": {"base_url": model_url},
                "routes": [
                    {"path": "/echo"},
                    {"path": "/tokens", "workload": "max_tokens", "max_workload": 1e6},
                    {"path": "/cost", "workload": "cost"},
                    {"path": "/fifo", "workload": "cost", "fifo": True},
                    {"path": "/heavy", "workload": heavy},
                    {"path": "/hooked", "request_hook": add_marker},
                    {"path": "/unwrap", "request_hook": unwrap_input},
                    {"path": "/in-place", "request_hook": mark_in_place},
                ],
                "perf": 100.0,
                "max_body_size": MAX_BODY,
                "sessions": {"max_sessions": 20, "max_lifetime": 3600},
            }
        )
        environment = Environment.from_env(
            {
                "REPORT_ADDR": self.autoscaler.url,
                "CONTAINER_ID": "7",
                "UNSECURED": "false",
                "MASTER_TOKEN": TOKEN,
                "PYWORKER_REPORT_INTERVAL": "0.05",
            }
        )
        self.worker = compose_worker(config, environment)
        runner = JsonErrorRunner(self.worker.create_app(), **RUNNER_OPTIONS)
        url = await self._serve(runner)
        self.port = int(url.rsplit(":", 1)[1])
        self.worker.public_url.value = environment.public_url(self.port)
        self.session = aiohttp.ClientSession()
        await wait_until(lambda: self.state.status.ready and self.state.verifier.has_key)

    async def _serve(self, runner: web.AppRunner) -> str:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.close()
        for runner in reversed(self.runners):
            await runner.cleanup()
        await self.autoscaler.close()

    @property
    def state(self) -> Worker:
        assert self.worker is not None
        return self.worker

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def auth(self, **fields: Any) -> dict[str, Any]:
        self.next_idx += 1
        url = self.state.url
        auth = {
            "cost": 10,
            "endpoint": "hostile",
            "reqnum": self.next_idx,
            "request_idx": self.next_idx,
            "url": url,
            "signature": self.keypair.sign(url),
        }
        return {**auth, **fields}

    async def post(
        self, path: str, body: Any, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        """POST `body` (bytes as they are, anything else as JSON); the status and JSON answer."""
        assert self.session is not None
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with self.session.post(self.url + path, data=data, headers=headers) as response:
            assert response.content_type == "application/json", await response.text()
            return response.status, await response.json()

    async def get(self, path: str) -> tuple[int, str]:
        assert self.session is not None
        async with self.session.get(self.url + path) as response:
            return response.status, await response.text()

    async def raw(self, request: bytes, *, read_interim: bool = False) -> bytes:
        """Send raw bytes on a fresh connection; what came back before it closed (or stalled)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(request)
            await writer.drain()
            answer = b""
            while True:
                try:
                    chunk = await asyncio.wait_for(reader.read(65536), 2.0)
                except asyncio.TimeoutError:
                    break
                if not chunk:
                    break
                answer += chunk
                if read_interim and b"\r\n\r\n" in answer:
                    break
            return answer
        finally:
            writer.close()

    async def serves_a_valid_request(self) -> None:
        """A valid request after the attack: 200, forwarded, reported; all reports sane."""
        auth = self.auth()
        before = len(self.model.bodies("/echo"))
        reports = len(self.autoscaler.worker_status)
        status, answer = await self.post("/echo", {"auth_data": auth, "payload": {"ok": 1}})
        assert (status, answer) == (200, {"ok": True})
        assert self.model.bodies("/echo")[before:] == [b'{"ok": 1}']
        await self.wait_reported(auth["request_idx"], reports)
        self.assert_reports_sane()
        for path in ("/status", "/metrics", "/health"):
            status_code, text = await self.get(path)
            assert status_code in (200, 401, 403), (path, status_code, text)
            assert "nan" not in text.lower().split() and "inf" not in text.lower().split()

    async def wait_reported(self, request_idx: int, reports: int = 0) -> None:
        """Until the autoscaler was told `request_idx` finished and had more than `reports`
        status reports (take the count before the request: a report follows its news)."""

        def finished() -> bool:
            return any(
                item["request_idx"] == request_idx
                for body in self.autoscaler.delete_requests
                for item in body["requests"]
            )

        await wait_until(finished)
        await self.autoscaler.wait_for_status(reports + 1)

    def assert_reports_sane(self) -> None:
        """Every report so far is well formed (the reporter being alive is what
        `wait_reported` proved: it reported a request made after the attack)."""
        assert not self.autoscaler.invalid
        assert self.autoscaler.worker_status, "the autoscaler heard nothing"
        for report in self.autoscaler.worker_status:
            for name in LOAD_FIELDS:
                value = report[name]
                assert isinstance(value, int | float) and math.isfinite(value), (name, report)
                if name != "new_load":
                    assert value >= 0, (name, report)
            for index in report["working_request_idxs"]:
                assert isinstance(index, int) and 0 <= index <= MAX_INDEX
        for body in self.autoscaler.delete_requests:
            for item in body["requests"]:
                assert (
                    isinstance(item["request_idx"], int) and 0 <= item["request_idx"] <= MAX_INDEX
                )

    def reported_idxs(self) -> set[int]:
        return {
            item["request_idx"]
            for body in self.autoscaler.delete_requests
            for item in body["requests"]
        }


@pytest.fixture
async def hostile(keypair: KeyPair) -> AsyncIterator[Hostile]:
    target = Hostile(keypair)
    await target.start()
    try:
        yield target
    finally:
        await target.stop()


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth - 1):
        value = {"a": value}
    return value


# --- 1. client numbers ---------------------------------------------------------------------
BAD_NUMBERS = [
    ("request_idx", 10**30),
    ("request_idx", "1" * 31),
    ("request_idx", 2**63),
    ("request_idx", -1),
    ("request_idx", True),
    ("request_idx", 1.5),
    ("request_idx", None),
    ("reqnum", -1),
    ("reqnum", "1" * 31),
    ("reqnum", 2**64),
    ("reqnum", False),
    ("cost", 1e308),
    ("cost", "1e308"),
    ("cost", MAX_WORKLOAD * 2),
    ("cost", True),
    ("cost", -0.5),
    ("cost", "NaN"),
    ("cost", "Infinity"),
    ("cost", [10]),
]


@pytest.mark.parametrize("path", ["/echo", "/cost", "/session/create"])
async def test_client_numbers_out_of_range_are_422_naming_the_field(
    hostile: Hostile, path: str
) -> None:
    for name, value in BAD_NUMBERS:
        auth = hostile.auth(**{name: value})
        status, answer = await hostile.post(path, {"auth_data": auth, "payload": {}})
        assert status == 422, (name, value, answer)
        assert answer["error"] == "invalid request"
        assert list(answer["auth_data"]) == [name], (name, value, answer)
    assert hostile.model.received == []
    assert hostile.state.ledger.in_progress == 0 and len(hostile.state.sessions) == 0
    await hostile.serves_a_valid_request()


async def test_numbers_at_their_limits_and_as_strings_are_served_and_reported_exactly(
    hostile: Hostile,
) -> None:
    edge = hostile.auth(request_idx=MAX_INDEX, reqnum=MAX_INDEX, cost=MAX_WORKLOAD)
    status, _ = await hostile.post("/cost", {"auth_data": edge, "payload": {}})
    assert status == 200
    as_text = hostile.auth(request_idx="0", reqnum="7", cost="12.5")
    assert (await hostile.post("/cost", {"auth_data": as_text, "payload": {}}))[0] == 200
    await hostile.wait_reported(MAX_INDEX)
    await hostile.wait_reported(0)

    def served() -> float:
        return float(sum(report["cur_perf"] for report in hostile.autoscaler.worker_status))

    await wait_until(lambda: served() >= MAX_WORKLOAD + 12.5)
    assert served() == MAX_WORKLOAD + 12.5
    await hostile.serves_a_valid_request()


async def test_a_31_digit_request_idx_on_session_create_leaves_status_and_reports_working(
    hostile: Hostile,
) -> None:
    auth = hostile.auth(request_idx=int("9" * 31))
    status, answer = await hostile.post("/session/create", {"auth_data": auth, "payload": {}})
    assert status == 422 and "request_idx" in answer["auth_data"]
    assert len(hostile.state.sessions) == 0
    await hostile.serves_a_valid_request()


@pytest.mark.parametrize("lifetime", [0, -1, 1e308, "1e308", True, "nan", [60], 10**30, 3601])
async def test_a_session_lifetime_out_of_range_is_422(hostile: Hostile, lifetime: Any) -> None:
    body = {"auth_data": hostile.auth(), "payload": {"lifetime": lifetime}}
    status, answer = await hostile.post("/session/create", body)
    assert status == 422, answer
    assert list(answer["payload"]) == ["lifetime"]
    assert len(hostile.state.sessions) == 0
    await hostile.serves_a_valid_request()


# --- 2. workload -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "max_tokens", [1e308, -5, True, "100", [1], {"n": 1}, 1e6 + 1, 2**64, 10**25]
)
async def test_an_unusable_workload_field_is_422_and_never_accounted(
    hostile: Hostile, max_tokens: Any
) -> None:
    for _ in range(2):  # twice: once used to make /metrics fail for good
        body = {"auth_data": hostile.auth(), "payload": {"max_tokens": max_tokens}}
        status, answer = await hostile.post("/tokens", body)
        assert status == 422, answer
        assert answer == {
            "error": "invalid request",
            "payload": {"max_tokens": answer["payload"]["max_tokens"]},
        }
    assert hostile.model.received == []
    assert hostile.state.ledger.totals == dict.fromkeys(hostile.state.ledger.totals, 0)
    await hostile.serves_a_valid_request()


async def test_a_workload_function_that_overflows_is_422(hostile: Hostile) -> None:
    body = {"auth_data": hostile.auth(), "payload": {"n": 1e10}}
    status, answer = await hostile.post("/heavy", body)
    assert status == 422 and "workload" in answer["payload"], answer
    body = {"auth_data": hostile.auth(), "payload": {"n": 1e-300}}
    assert (await hostile.post("/heavy", body))[0] == 200
    await hostile.serves_a_valid_request()


async def test_huge_and_tiny_workloads_leave_exactly_zero_load_when_nothing_runs(
    hostile: Hostile,
) -> None:
    costs = [MAX_WORKLOAD, 0.1, 0.2, 1e-6, MAX_WORKLOAD - 0.3, 123456.789]
    bodies = [{"auth_data": hostile.auth(cost=cost), "payload": {}} for cost in costs]
    answers = await asyncio.gather(
        *(hostile.post(path, body) for body in bodies for path in ("/fifo", "/cost"))
    )
    assert [status for status, _ in answers] == [200] * len(answers)
    for cost in (MAX_WORKLOAD, MAX_WORKLOAD):  # sessions with the biggest cost, then ended
        created = await hostile.post(
            "/session/create", {"auth_data": (auth := hostile.auth(cost=cost)), "payload": {}}
        )
        assert created[0] == 201
        query = {"session_id": created[1]["session_id"], "session_auth": auth}
        assert (await hostile.post("/session/end", query))[0] == 200
    worker = hostile.state
    assert worker.ledger.current_load == 0.0
    assert all(gate.workload == 0.0 for gate in worker.gates.values())
    await hostile.serves_a_valid_request()
    # Nothing runs any more: the autoscaler is told exactly 0 (a report may have gone out
    # while the last request ran, so wait for the next).
    await wait_until(lambda: hostile.autoscaler.worker_status[-1]["cur_load"] == 0.0)
    assert worker.ledger.current_load == 0.0


# --- 7. deep nesting, non-UTF-8, plain-text pages ----------------------------------------
async def test_a_payload_nested_too_deeply_is_422_and_not_an_engine_error(
    hostile: Hostile,
) -> None:
    for path in ("/echo", "/hooked", "/session/create"):
        body: Any = {"auth_data": hostile.auth(), "payload": {"deep": nested(300)}}
        status, answer = await hostile.post(path, body)
        assert status == 422, (path, answer)
        assert "levels deep" in answer["payload"]
    assert hostile.model.received == []
    assert hostile.state.ledger.totals == dict.fromkeys(hostile.state.ledger.totals, 0)
    # Just within the limit: forwarded as sent.
    deep = orjson.dumps({"deep": nested(MAX_DEPTH - 1)})
    body = b'{"auth_data":' + orjson.dumps(hostile.auth()) + b',"payload":' + deep + b"}"
    assert (await hostile.post("/echo", body))[0] == 200
    assert hostile.model.bodies("/echo") == [deep]
    # Beyond what any parser here reads: still a clear 422.
    status, answer = await hostile.post("/echo", b"[" * 5000 + b"]" * 5000)
    assert status == 422 and answer["error"].startswith("request body is not valid JSON")
    await hostile.serves_a_valid_request()


async def test_deep_session_fields_are_422_and_session_routes_keep_answering(
    hostile: Hostile,
) -> None:
    payload: dict[str, Any] = {
        "on_close_route": "/closed",
        "on_close_payload": {"deep": nested(300)},
    }
    status, answer = await hostile.post(
        "/session/create", {"auth_data": hostile.auth(), "payload": payload}
    )
    assert status == 422 and "payload" in answer
    status, answer = await hostile.post(
        "/session/create", {"auth_data": hostile.auth(extra=nested(300)), "payload": {}}
    )
    assert status == 422 and "auth_data" in answer
    for depth in range(MAX_DEPTH - 4, MAX_DEPTH + 1):  # at the limit: refused, or described
        auth = hostile.auth(extra=nested(depth))
        status, created = await hostile.post("/session/create", {"auth_data": auth, "payload": {}})
        if status == 201:
            query = {"session_id": created["session_id"], "session_auth": auth}
            assert (await hostile.post("/session/get", query))[0] == 200, depth
        else:
            assert status == 422, (depth, created)
    auth = hostile.auth()
    payload = {"on_close_route": "/closed", "on_close_payload": {"deep": nested(200)}}
    status, created = await hostile.post("/session/create", {"auth_data": auth, "payload": payload})
    assert status == 201
    query = {"session_id": created["session_id"], "session_auth": auth}
    status, described = await hostile.post("/session/get", query)
    assert status == 200 and described["on_close_payload"] == payload["on_close_payload"]
    deep_query = {"session_id": created["session_id"], "session_auth": nested(300)}
    assert (await hostile.post("/session/get", deep_query))[0] == 422
    assert (await hostile.post("/session/end", query))[0] == 200
    await wait_until(lambda: bool(hostile.model.bodies("/closed")))
    closed = json.loads(hostile.model.bodies("/closed")[0])
    assert closed["deep"] == payload["on_close_payload"]["deep"]
    await hostile.serves_a_valid_request()


def deep_text(depth: int) -> bytes:
    """A value `depth` levels deep, written directly: orjson cannot write past MAX_DEPTH."""
    return b'{"a":' * (depth - 1) + b"1" + b"}" * (depth - 1)


# Past MAX_DEPTH; near Python's recursion limit (what once made the body's walk and the
# session fingerprint fail with 500); past what orjson parses at all (1024 levels).
DEPTHS = [MAX_DEPTH + 2, 990, 2000]
SIGNED_ROUTES = ["/echo", "/hooked", "/fifo", "/session/create"]
QUERY_ROUTES = ["/session/get", "/session/health", "/session/end"]


def deep_envelopes(auth: bytes, depth: int) -> list[tuple[str, bytes]]:
    """(the member named in the 422, a body with that member nested `depth` levels deep)."""
    deep = deep_text(depth)
    spaced = b'"payload": {"x":  1}'  # not as orjson writes it: found by walking the body
    envelopes = [
        (b'{"session_id": ', b', "auth_data": ' + auth + b", " + spaced + b"}"),
        (b'{"auth_data": ' + auth + b", " + spaced + b', "session_id": ', b"}"),
        (b'{"auth_data": ' + auth[:-1] + b', "deep": ', b"}, " + spaced + b"}"),
        (b'{"auth_data": ' + auth[:-1] + b', "deep": ', b"}, " + spaced + b', "session_id": "x"}'),
        (b'{"extra": ', b', "auth_data": ' + auth + b", " + spaced + b', "k": 1}'),
    ]
    names = ["session_id", "session_id", "auth_data", "auth_data", "extra"]
    return [
        (name, before + deep + after)
        for name, (before, after) in zip(names, envelopes, strict=True)
    ]


def assert_no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    logged = [record for record in caplog.records if record.exc_info or record.levelno >= 40]
    assert logged == [], [record.getMessage() for record in logged]


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("path", SIGNED_ROUTES)
async def test_a_deep_member_anywhere_in_the_envelope_is_422_naming_it(
    hostile: Hostile, path: str, depth: int, caplog: pytest.LogCaptureFixture
) -> None:
    # A session, so that a deep auth_data or session_id meets a real one to compare with.
    auth = hostile.auth()
    status, created = await hostile.post("/session/create", {"auth_data": auth, "payload": {}})
    assert status == 201
    for name, body in deep_envelopes(orjson.dumps(hostile.auth()), depth):
        status, answer = await hostile.post(path, body)
        assert status == 422, (name, answer)
        assert answer == {"error": "invalid request", name: TOO_DEEP}, name
    assert_no_traceback(caplog)
    assert hostile.model.received == []
    assert hostile.state.ledger.in_progress == 1 and len(hostile.state.sessions) == 1
    # The session still works, and so does a request outside it.
    inside = {"auth_data": auth, "payload": {"in": "session"}, "session_id": created["session_id"]}
    assert await hostile.post("/echo", inside) == (200, {"ok": True})
    await hostile.serves_a_valid_request()


@pytest.mark.parametrize("path", SIGNED_ROUTES)
async def test_a_deep_payload_before_the_payload_kept_is_ignored_or_422(
    hostile: Hostile, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """With the key twice, the last payload counts (docs/input.md); an earlier one too deep
    for any parser here is a 422 naming it, never a 500."""
    for depth, expected in ((MAX_DEPTH + 2, 200), (2000, 422)):
        auth = orjson.dumps(hostile.auth())
        body = b'{"payload": ' + deep_text(depth) + b', "payload": {"x":  1}, "auth_data": '
        status, answer = await hostile.post(path, body + auth + b"}")
        if expected == 422:
            assert (status, answer) == (422, {"error": "invalid request", "payload": TOO_DEEP})
        else:
            assert status in (200, 201), answer
    assert_no_traceback(caplog)
    if path in ("/echo", "/fifo"):  # as sent (a hook's payload is written anew)
        assert hostile.model.bodies(path) == [b'{"x":  1}']
    await hostile.serves_a_valid_request()


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("path", QUERY_ROUTES)
async def test_a_deep_member_of_a_session_query_is_422_naming_it(
    hostile: Hostile, path: str, depth: int, caplog: pytest.LogCaptureFixture
) -> None:
    auth = hostile.auth()
    status, created = await hostile.post("/session/create", {"auth_data": auth, "payload": {}})
    assert status == 201
    deep, session_id, session_auth = deep_text(depth), created["session_id"], orjson.dumps(auth)
    query = b'"session_id": "%s", "session_auth": ' % session_id.encode()
    bodies = [
        ("session_id", b'{"session_id": ' + deep + b', "session_auth": ' + session_auth + b"}"),
        ("session_auth", b"{" + query + deep + b"}"),
        ("extra", b'{"extra": ' + deep + b", " + query + session_auth + b"}"),
    ]
    for name, body in bodies:
        status, answer = await hostile.post(path, body)
        assert (status, answer) == (422, {"error": "invalid request", name: TOO_DEEP}), name
    assert_no_traceback(caplog)
    assert len(hostile.state.sessions) == 1
    valid = {"session_id": session_id, "session_auth": auth}
    status, _ = await hostile.post(path, valid)
    assert status == 200
    await hostile.serves_a_valid_request()


@pytest.mark.parametrize(
    "body",
    [
        b'{"auth_data": "\xff\xfe", "payload": {}}',
        b'{"auth_data": {}, "payload": {"text": "\xc3\x28"}}',
        b'{"auth_data": {}, "payload": {"text": "\\ud800"}}',
        b"\xef\xbb\xbf{}",
        b"\x00\x01\x02",
    ],
)
@pytest.mark.parametrize("path", ["/echo", "/session/create", "/session/get", "/session/end"])
async def test_bodies_that_are_not_utf8_are_422(hostile: Hostile, path: str, body: bytes) -> None:
    status, answer = await hostile.post(path, body)
    assert status == 422 and "error" in answer
    assert hostile.model.received == []


async def test_a_bearer_token_that_is_not_utf8_is_401(hostile: Hostile) -> None:
    request = (
        b"POST /pyworker/update HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\x80\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    answer = await hostile.raw(request)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401"), answer
    assert json.loads(body) == {"error": "invalid token"}
    await hostile.serves_a_valid_request()


async def test_unknown_paths_and_methods_are_json(hostile: Hostile) -> None:
    assert hostile.session is not None
    async with hostile.session.get(hostile.url + "/no/such/path") as response:
        assert response.status == 404 and await response.json() == {"error": "not found"}
    async with hostile.session.get(hostile.url + "/echo%ff%fe") as response:
        assert response.status == 404 and await response.json() == {"error": "not found"}
    async with hostile.session.get(hostile.url + "/echo") as response:
        assert response.status == 405
        assert await response.json() == {"error": "method not allowed"}
        assert "POST" in response.headers["Allow"]
    async with hostile.session.put(hostile.url + "/session/get", data=b"{}") as response:
        assert response.status == 405 and response.content_type == "application/json"
    await hostile.serves_a_valid_request()


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 10_000 + b"\r\n\r\n",
        b"POST /echo\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS hello on the plain port
    ],
)
async def test_requests_aiohttp_cannot_parse_are_json_400(
    hostile: Hostile, request_bytes: bytes
) -> None:
    answer = await hostile.raw(request_bytes)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] in (b"400", b"404"), answer
    assert b"application/json" in head.lower(), answer
    assert "error" in json.loads(body)
    await hostile.serves_a_valid_request()


async def test_expect_100_continue_over_the_limit_is_413_without_100(hostile: Hostile) -> None:
    for path, limit in (("/echo", MAX_BODY), ("/session/create", 64 * 1024)):
        request = (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {limit + 1}\r\nExpect: 100-continue\r\n\r\n"
        ).encode()
        answer = await hostile.raw(request)
        assert answer.startswith(b"HTTP/1.1 413"), answer
        assert b"100 Continue" not in answer
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"].startswith("request body")
    request = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: teapot\r\n\r\n"
    answer = await hostile.raw(request)
    assert answer.startswith(b"HTTP/1.1 417") and b"application/json" in answer
    await hostile.serves_a_valid_request()


async def test_expect_100_continue_within_the_limit_continues(hostile: Hostile) -> None:
    body = json.dumps({"auth_data": hostile.auth(), "payload": {"x": 1}}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", hostile.port)
    try:
        writer.write(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        writer.write(body)
        final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert final.startswith(b"HTTP/1.1 200")
    finally:
        writer.close()
    assert hostile.model.bodies("/echo") == [b'{"x": 1}']


# --- what a refused request leaves behind --------------------------------------------------
def urlsplit_misses() -> int:
    """How often the standard library's url cache took a new url (it keeps each one)."""
    info = getattr(urllib.parse.urlsplit, "cache_info", None)
    if info is not None:  # Python 3.11+: an lru_cache
        return int(info().misses)
    cache = urllib.parse._parse_cache  # type: ignore[attr-defined]  # Python 3.10: a dict
    return sum(1 for key in cache if len(key[0]) > MAX_URL)


async def test_nothing_a_refused_request_sent_stays_in_a_cache(hostile: Hostile) -> None:
    """The fields read before the signature is checked (the url, for the worker's address,
    above all) enter no cache: each such request is 401, and every cache is as it was."""
    own, size = hostile.state.url, MAX_BODY // 8
    refused: list[dict[str, Any]] = []
    for index in range(4):
        filler = f"{index}" + "a" * size
        big = {"endpoint": filler, "signature": "A" * size, "extra": filler}
        refused += [
            hostile.auth(url=f"http://{filler}.example:1", **big),  # another worker
            hostile.auth(url=f"{own}/{filler}", **big),  # this worker, but over MAX_URL
            hostile.auth(**big),  # this worker, a forged signature
        ]
    verifier = hostile.state.verifier
    assert isinstance(verifier, SignatureVerifier)
    assert worker_address(own) is not None  # the worker's own address: in the cache now
    addresses, splits, pairs = _cached_address.cache_info(), urlsplit_misses(), len(verifier)
    for auth in refused:
        status, answer = await hostile.post("/echo", {"auth_data": auth, "payload": {}})
        assert status == 401 and answer["error"] in (
            "auth_data was signed for another worker",
            "invalid signature",
        ), answer
    assert _cached_address.cache_info().misses == addresses.misses
    assert _cached_address.cache_info().currsize == addresses.currsize
    assert urlsplit_misses() == splits
    assert len(verifier) == pairs
    assert hostile.model.received == []
    assert hostile.state.ledger.totals == dict.fromkeys(hostile.state.ledger.totals, 0)
    await hostile.serves_a_valid_request()


# --- session_auth -----------------------------------------------------------------------------
async def test_session_auth_must_equal_the_auth_data_exactly(hostile: Hostile) -> None:
    auth = hostile.auth(cost=10, extra_key="kept")
    status, created = await hostile.post("/session/create", {"auth_data": auth, "payload": {}})
    assert status == 201
    session_id = created["session_id"]
    near_misses = [
        {**auth, "cost": "10"},
        {**auth, "cost": 10.5},
        {**auth, "request_idx": str(auth["request_idx"])},
        {**auth, "reqnum": auth["reqnum"] + 1},
        {**auth, "extra": 1},
        {key: value for key, value in auth.items() if key != "extra_key"},
        {**auth, "extra_key": ["kept"]},
        {**auth, "signature": auth["signature"].lower()},
        {**auth, "url": auth["url"] + "/"},
        [auth],
        "auth",
        None,
    ]
    for session_auth in near_misses:
        for route in ("/session/get", "/session/health", "/session/end"):
            query = {"session_id": session_id, "session_auth": session_auth}
            status, answer = await hostile.post(route, query)
            assert status in (401, 422), (route, session_auth, answer)
    boolean = hostile.auth(cost=1)
    status, other = await hostile.post("/session/create", {"auth_data": boolean, "payload": {}})
    query = {"session_id": other["session_id"], "session_auth": {**boolean, "cost": True}}
    assert (await hostile.post("/session/get", query))[0] == 401
    # The same object, its keys in another order: the session is proved.
    same = dict(reversed(list(auth.items())))
    status, described = await hostile.post(
        "/session/get", {"session_id": session_id, "session_auth": same}
    )
    assert status == 200 and described["auth_data"] == auth
    await hostile.serves_a_valid_request()


# --- 8. the payload as sent ---------------------------------------------------------------
PAYLOAD_TEXTS = [
    b'{"n": 123456789012345678901234567890, "m": -1180591620717411303424}',
    b'{"n":18446744073709551616}',
    b'{"x": 1.0E2, "y": 1e-7, "z": -0.0, "w": 0.1000000000000000055511151231257827}',
    b'{"text": "caf\\u00e9 \\/ \\ud83d\\ude00 \xc3\xa9"}',
    b'{\n    "pretty": [\n        1,\n        2\n    ],\n    "k": {}\n}',
    b'{"a": 1, "a": 2}',
    b"{}",
    b'{"nested": {"payload": {"x": 1}}, "payload": "text"}',
]


@pytest.mark.parametrize("payload_text", PAYLOAD_TEXTS)
@pytest.mark.parametrize("payload_first", [False, True])
async def test_the_model_server_receives_the_payload_as_the_client_wrote_it(
    hostile: Hostile, payload_text: bytes, payload_first: bool
) -> None:
    auth = orjson.dumps(hostile.auth())
    members = [b'"auth_data": ' + auth, b'"payload":   ' + payload_text]
    if payload_first:
        members.reverse()
    body = b"{ " + b" ,\n ".join(members) + b' , "session_id": null }'
    status, answer = await hostile.post("/echo", body)
    assert (status, answer) == (200, {"ok": True})
    assert hostile.model.bodies("/echo") == [payload_text]


async def test_a_payload_a_hook_changed_is_encoded_again(hostile: Hostile) -> None:
    body = b'{"auth_data": ' + orjson.dumps(hostile.auth()) + b', "payload": {"x":  1}}'
    assert (await hostile.post("/hooked", body))[0] == 200
    assert hostile.model.bodies("/hooked") == [b'{"x":1,"hooked":true}']


async def test_a_hook_that_leaves_the_payload_as_it_was_forwards_it_as_sent(
    hostile: Hostile,
) -> None:
    payload_text = b'{"n": 123456789012345678901234567890,  "s": "caf\\u00e9"}'
    body = b'{"auth_data": ' + orjson.dumps(hostile.auth()) + b', "payload": ' + payload_text + b"}"
    assert (await hostile.post("/unwrap", body))[0] == 200
    assert hostile.model.bodies("/unwrap") == [payload_text]
    wrapped = (
        b'{"auth_data": ' + orjson.dumps(hostile.auth()) + b', "payload": {"input": {"a": 1}}}'
    )
    assert (await hostile.post("/unwrap", wrapped))[0] == 200
    assert hostile.model.bodies("/unwrap")[1] == b'{"a":1}'


async def test_a_hook_that_changes_the_payload_in_place_is_encoded_again(hostile: Hostile) -> None:
    body = b'{"auth_data": ' + orjson.dumps(hostile.auth()) + b', "payload": {"x":  1}}'
    assert (await hostile.post("/in-place", body))[0] == 200
    assert hostile.model.bodies("/in-place") == [b'{"x":1,"marked":1}']


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "x-unknown"])
async def test_a_body_that_does_not_decode_is_a_json_4xx(hostile: Hostile, encoding: str) -> None:
    body = b"this is not " + encoding.encode() + b" at all" * 50
    status, answer = await hostile.post("/echo", body, headers={"Content-Encoding": encoding})
    assert 400 <= status < 500 and "error" in answer, (status, answer)
    assert hostile.model.received == []
    await hostile.serves_a_valid_request()
