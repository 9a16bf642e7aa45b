from __future__ import annotations

import asyncio
import base64
import io
import json
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from pyworker.devtools.local.autoscaler import LocalAutoscaler
from pyworker.devtools.local.fleet import Fleet
from pyworker.devtools.local.table import LiveTable, render_table, watch
from pyworker.protocol.auth import AuthData, SignatureVerifier, Verdict
from pyworker.protocol.signing import SigningKey

_KEY: SigningKey | None = None


def shared_key() -> SigningKey:
    global _KEY
    if _KEY is None:
        _KEY = SigningKey.generate()  # 2048-bit generation is slow: one for the whole file
    return _KEY


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Running:
    def __init__(self, autoscaler: LocalAutoscaler, session: aiohttp.ClientSession) -> None:
        self.autoscaler = autoscaler
        self.session = session

    async def post(self, path: str, body: Any) -> tuple[int, Any]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with self.session.post(self.autoscaler.url + path, data=data) as answer:
            return answer.status, await answer.json()

    async def get_json(self, path: str) -> Any:
        async with self.session.get(self.autoscaler.url + path) as answer:
            assert answer.status == 200
            return await answer.json()

    async def report(self, worker_id: int, **fields: Any) -> None:
        status, body = await self.post("/worker_status/", ready_report(worker_id, **fields))
        assert (status, body) == (200, {"ok": True})

    async def route(self, cost: float = 10.0, **fields: Any) -> dict[str, Any]:
        status, body = await self.post("/route/", {"endpoint": "demo", "cost": cost, **fields})
        assert status == 200
        assert isinstance(body, dict)
        return body


def ready_report(worker_id: int, **fields: Any) -> dict[str, Any]:
    report: dict[str, Any] = {
        "id": worker_id,
        "mtoken": "",
        "version": "test",
        "loadtime": 1.5,
        "cur_load": 0.0,
        "new_load": 0.0,
        "rej_load": 0.0,
        "cur_perf": 0.0,
        "max_perf": 100.0,
        "error_msg": "",
        "num_requests_working": 0,
        "num_requests_recieved": 0,
        "additional_disk_usage": 0.0,
        "working_request_idxs": [],
        "cur_capacity": 0,
        "max_capacity": 0,
        "url": f"http://127.0.0.1:{4000 + worker_id}",
    }
    report.update(fields)
    return report


@pytest.fixture
def clock() -> Clock:
    return Clock()


async def start(**options: Any) -> Running:
    autoscaler = LocalAutoscaler(key=shared_key(), **options)
    await autoscaler.start("127.0.0.1", 0)
    return Running(autoscaler, aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)))


@pytest.fixture
async def running(clock: Clock) -> AsyncIterator[Running]:
    server = await start(fleet=Fleet(clock=clock))
    yield server
    await server.session.close()
    await server.autoscaler.stop()


async def test_route_signature_verifies_with_the_served_public_key(running: Running) -> None:
    await running.report(7)
    answer = await running.route(cost=12.5)
    async with running.session.get(running.autoscaler.url + "/pubkey/") as reply:
        pem = await reply.read()
    key = serialization.load_pem_public_key(pem)
    assert isinstance(key, rsa.RSAPublicKey)
    message = json.dumps({"url": answer["url"]}, indent=4, sort_keys=True).encode()
    key.verify(base64.b64decode(answer["signature"]), message, padding.PKCS1v15(), hashes.SHA256())
    assert answer["url"] == "http://127.0.0.1:4007"
    assert answer["endpoint"] == "demo"
    assert answer["cost"] == 12.5
    assert isinstance(answer["reqnum"], int) and isinstance(answer["request_idx"], int)
    verifier = SignatureVerifier()  # and the worker's own check accepts it
    verifier.load_pem(pem)
    assert verifier.check(AuthData.model_validate(answer)) is Verdict.ACCEPTED
    tampered = AuthData.model_validate({**answer, "url": "http://127.0.0.1:1"})
    assert verifier.check(tampered) is not Verdict.ACCEPTED


async def test_route_waits_while_no_worker_is_ready(running: Running) -> None:
    answer = await running.route()
    assert "url" not in answer
    assert answer["status"] == "waiting"
    assert answer["ready_workers"] == 0
    await running.report(1, max_perf=0.0, loadtime=0.0)  # still loading
    await running.report(2, error_msg="CUDA out of memory")  # errored
    await running.report(3, max_perf=0.0)  # draining
    answer = await running.route(request_idx=answer["request_idx"])
    assert "url" not in answer
    counts = (answer["loading_workers"], answer["errored_workers"], answer["draining_workers"])
    assert counts == (1, 1, 1)


async def test_route_answers_once_a_worker_reports_ready(running: Running) -> None:
    await running.report(3, max_perf=0.0, loadtime=0.0)
    waiting = await running.route()
    assert "url" not in waiting
    await running.report(3)
    answer = await running.route(request_idx=waiting["request_idx"])
    assert answer["url"] == "http://127.0.0.1:4003"
    assert answer["request_idx"] == waiting["request_idx"]  # the client kept its place


async def test_route_numbers_requests(running: Running) -> None:
    await running.report(1)
    first, second = await running.route(), await running.route(request_idx=0)
    assert second["reqnum"] > first["reqnum"]
    assert second["request_idx"] > first["request_idx"]
    assert (await running.route(request_idx=500))["request_idx"] == 500
    assert (await running.route())["request_idx"] > 500


async def test_route_prefers_least_load_per_perf(running: Running) -> None:
    # Worker 1 has more load but far more perf: 50/100 beats 10/10.
    await running.report(1, cur_load=50.0, max_perf=100.0)
    await running.report(2, cur_load=10.0, max_perf=10.0)
    assert (await running.route(cost=1.0))["url"] == "http://127.0.0.1:4001"


async def test_route_breaks_ties_on_requests_in_progress(running: Running) -> None:
    await running.report(1, cur_load=10.0, num_requests_working=3)
    await running.report(2, cur_load=10.0, num_requests_working=1)
    assert (await running.route(cost=0.0))["url"] == "http://127.0.0.1:4002"


async def test_route_spreads_a_burst_between_reports(running: Running) -> None:
    await running.report(1)
    await running.report(2)
    urls = {(await running.route(cost=10.0))["url"] for _ in range(2)}
    assert urls == {"http://127.0.0.1:4001", "http://127.0.0.1:4002"}


async def test_routed_cost_counts_as_load_until_the_next_report(running: Running) -> None:
    await running.report(1, cur_load=0.0, max_perf=1000.0)
    await running.report(2, cur_load=5.0, max_perf=100.0)
    assert (await running.route(cost=100.0))["url"] == "http://127.0.0.1:4001"
    # Worker 1 now carries 100/1000 = 0.1 against worker 2's 5/100 = 0.05.
    assert (await running.route(cost=100.0))["url"] == "http://127.0.0.1:4002"
    # Fresh reports supersede the estimates: 20/1000 = 0.02 against 1/100 = 0.01.
    await running.report(1, cur_load=20.0, max_perf=1000.0)
    await running.report(2, cur_load=1.0, max_perf=100.0)
    assert (await running.route(cost=1.0))["url"] == "http://127.0.0.1:4002"


async def test_silent_worker_goes_stale_and_gets_nothing(running: Running, clock: Clock) -> None:
    await running.report(1)
    clock.now += 31
    answer = await running.route()
    assert "url" not in answer
    assert answer["stale_workers"] == 1
    await running.report(1)
    assert "url" in await running.route()


async def test_reports_are_recorded_with_bounded_history(clock: Clock) -> None:
    server = await start(fleet=Fleet(history_size=3, clock=clock))
    try:
        for load in range(5):
            await server.report(9, cur_load=float(load), mtoken="token", extra_field="kept")
        latest = server.autoscaler.reports[9]
        assert latest["cur_load"] == 4.0
        assert latest["extra_field"] == "kept"
        assert "mtoken" not in latest
        fleet = await server.get_json("/fleet")
        [worker] = fleet["workers"]
        assert worker["state"] == "ready"
        assert worker["reports"] == 5
        assert worker["history"]["cur_load"] == [2.0, 3.0, 4.0]
        assert "token" not in json.dumps(fleet)
        limited = await server.get_json("/fleet?history=1")
        assert limited["workers"][0]["history"]["cur_load"] == [4.0]
    finally:
        await server.session.close()
        await server.autoscaler.stop()


async def test_delete_requests_are_recorded_in_both_forms(running: Running) -> None:
    await running.report(4)
    current = {
        "worker_id": 4,
        "mtoken": "",
        "requests": [
            {
                "request_idx": 11,
                "success": True,
                "status": "Success",
                "entered_queue_at": 1.0,
                "work_started_at": 2.0,
                "work_completed_at": 3.0,
            },
            {"request_idx": 12, "success": True, "status": "Cancelled"},
        ],
    }
    assert await running.post("/delete_requests/", current) == (200, {"ok": True, "recorded": 2})
    older = {"worker_id": 4, "mtoken": "", "request_idxs": [13, 14], "success": False}
    assert await running.post("/delete_requests/", older) == (200, {"ok": True, "recorded": 2})
    finished = running.autoscaler.finished
    assert [entry.request_idx for entry in finished] == [11, 12, 13, 14]
    assert [entry.status for entry in finished] == ["Success", "Cancelled", "Error", "Error"]
    assert finished[0].work_completed_at == 3.0
    fleet = await running.get_json("/fleet")
    assert fleet["workers"][0]["finished"] == {"Success": 1, "Cancelled": 1, "Error": 2}
    assert fleet["finished"]["total"] == 4


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/route/", b"{not json"),
        ("/route/", b"[]"),
        ("/route/", b'{"endpoint": "demo", "cost": "lots"}'),
        ("/route/", b'{"endpoint": "demo", "cost": -1}'),
        ("/worker_status/", b"{not json"),
        ("/worker_status/", b'"a string"'),
        ("/worker_status/", b'{"url": "http://x"}'),
        ("/worker_status/", b'{"id": 1, "max_perf": "fast"}'),
        ("/worker_status/", b'{"id": 1, "cur_load": NaN}'),
        ("/delete_requests/", b"{not json"),
        ("/delete_requests/", b'{"worker_id": 1}'),
        ("/delete_requests/", b'{"worker_id": 1, "requests": [{"success": true}]}'),
    ],
)
async def test_malformed_bodies_get_400(running: Running, path: str, body: bytes) -> None:
    status, answer = await running.post(path, body)
    assert status == 400
    assert answer["error"]
    assert running.autoscaler.reports == {}


async def test_tokens_and_keys_are_checked_only_when_configured() -> None:
    server = await start(endpoint="demo", api_key="client-key", master_token="secret")
    try:
        status, _ = await server.post("/worker_status/", ready_report(1, mtoken="wrong"))
        assert status == 401
        status, _ = await server.post("/worker_status/", ready_report(1, mtoken="secret"))
        assert status == 200
        finished = {"worker_id": 1, "request_idxs": [1], "success": True}
        assert (await server.post("/delete_requests/", finished))[0] == 401
        assert (await server.post("/delete_requests/", {**finished, "mtoken": "secret"}))[0] == 200
        assert (await server.post("/route/", {"endpoint": "demo", "cost": 1}))[0] == 401
        route = {"endpoint": "demo", "cost": 1, "api_key": "client-key"}
        assert (await server.post("/route/", route))[0] == 200
        assert (await server.post("/route/", {**route, "endpoint": "other"}))[0] == 404
        headers = {"Authorization": "Bearer client-key"}
        url = server.autoscaler.url + "/route/"
        async with server.session.post(url, json={"endpoint": "demo"}, headers=headers) as a:
            assert a.status == 200
    finally:
        await server.session.close()
        await server.autoscaler.stop()


async def test_dashboard_is_self_contained_and_polls_fleet(running: Running) -> None:
    async with running.session.get(running.autoscaler.url + "/") as answer:
        assert answer.status == 200
        assert answer.content_type == "text/html"
        page = await answer.text()
    assert "/fleet" in page
    assert "<canvas" in page or 'createElement("canvas")' in page
    for external in ("<link", "src=", "http://", "https://", "innerHTML"):
        assert external not in page


async def test_fleet_lists_worker_states(running: Running) -> None:
    await running.report(1)
    await running.report(2, max_perf=0.0, loadtime=0.0)
    await running.report(3, error_msg="boom")
    await running.report(4, max_perf=0.0)  # had loaded (loadtime > 0), now stopping
    fleet = await running.get_json("/fleet")
    states = {worker["id"]: worker["state"] for worker in fleet["workers"]}
    assert states == {1: "ready", 2: "loading", 3: "errored", 4: "draining"}
    expected = {"loading": 1, "ready": 1, "errored": 1, "draining": 1, "stale": 0}
    assert fleet["counts"] == expected
    async with running.session.get(running.autoscaler.url + "/fleet?history=x") as answer:
        assert answer.status == 400


def sample_fleet() -> dict[str, Any]:
    return {
        "endpoint": "demo",
        "counts": {"ready": 1, "errored": 1},
        "finished": {"total": 3},
        "workers": [
            {
                "id": 1,
                "state": "ready",
                "url": "http://127.0.0.1:4001",
                "cur_load": 50.0,
                "max_perf": 200.0,
                "num_requests_working": 2,
                "routed": 5,
                "finished": {"Success": 2, "Error": 1},
                "seconds_since_report": 1.2,
                "error_msg": "",
            },
            {"id": 2, "state": "errored", "error_msg": "bad\nthings", "seconds_since_report": 3},
        ],
    }


def test_table_shows_each_worker() -> None:
    text = render_table(sample_fleet())
    lines = text.splitlines()
    assert lines[0].startswith("endpoint demo: 2 workers")
    assert lines[1].split()[:2] == ["ID", "STATE"]
    assert lines[2].split()[:3] == ["1", "ready", "http://127.0.0.1:4001"]
    assert "25%" in lines[2]
    assert "1s ago" in lines[2]
    assert any(line.strip() == "└ error: bad things" for line in lines)
    assert "ago" not in render_table(sample_fleet(), show_age=False)


def test_live_table_redraws_in_place_on_a_terminal() -> None:
    stream = io.StringIO()
    table = LiveTable(stream, interactive=True)
    table.update(sample_fleet())
    assert "\x1b[" not in stream.getvalue()
    table.update(sample_fleet())
    assert "\x1b[5F\x1b[J" in stream.getvalue()  # back over the 5 lines drawn, then clear


def test_live_table_prints_plain_lines_only_on_change() -> None:
    stream = io.StringIO()
    table = LiveTable(stream, interactive=False)
    fleet = sample_fleet()
    table.update(fleet)
    fleet["workers"][0]["seconds_since_report"] = 9.0  # the clock alone is no change
    table.update(fleet)
    assert stream.getvalue().count("endpoint demo") == 1
    fleet["workers"][0]["state"] = "stale"
    table.update(fleet)
    assert stream.getvalue().count("endpoint demo") == 2
    assert "\x1b" not in stream.getvalue()


async def test_watch_renders_the_served_fleet(running: Running) -> None:
    await running.report(5)

    class Recording(LiveTable):
        def update(self, fleet: Any) -> None:
            super().update(fleet)
            stop.set()

    stop = asyncio.Event()
    stream = io.StringIO()
    await asyncio.wait_for(watch(running.autoscaler.url, Recording(stream, False), stop=stop), 10)
    assert "http://127.0.0.1:4005" in stream.getvalue()


async def test_runs_as_a_process_and_stops_on_sigterm() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pyworker.devtools.local.autoscaler",
        "--port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), timeout=20)
        url = line.decode().split("listening on ")[1].strip()
        async with (
            aiohttp.ClientSession() as session,
            session.get(url + "/pubkey/", timeout=aiohttp.ClientTimeout(total=5)) as answer,
        ):
            assert (await answer.text()).startswith("-----BEGIN PUBLIC KEY-----")
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=10) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
