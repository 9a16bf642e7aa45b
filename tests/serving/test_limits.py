"""Abuse resistance on real sockets: slow clients, huge headers, refusals that leave no trace.

The worker is served by `pyworker.serving.server.serve` itself (main and side port), with short body
and keep-alive timeouts from the environment, in front of a scriptable model server and a
recording autoscaler.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from pyworker.config import WorkerConfig
from pyworker.config.environment import Environment
from pyworker.serving.compose import Worker, compose_worker
from pyworker.serving.server import serve
from tests.conftest import KeyPair, ModelServer, wait_until
from tests.support.fake_autoscaler import FakeAutoscaler

BODY_TIMEOUT = 0.5
KEEPALIVE_TIMEOUT = 1.0
SLACK = 1.5  # scheduling slack on a loaded 2-core machine
TOKEN = "master-token-b7d1e0"
SIDE_LINE = re.compile(r"/session/end also on http://127\.0\.0\.1:(\d+)")


@dataclass
class Served:
    worker: Worker
    autoscaler: FakeAutoscaler
    side_port: int
    session: aiohttp.ClientSession
    output: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.worker.url.rsplit(":", 1)[1])

    async def post(self, path: str, body: Any, **options: Any) -> tuple[int, bytes]:
        url = f"http://127.0.0.1:{self.port}{path}"
        async with self.session.post(url, json=body, **options) as response:
            return response.status, await response.read()


@pytest.fixture
async def served(
    keypair: KeyPair, model_server: ModelServer, capsys: pytest.CaptureFixture[str]
) -> AsyncIterator[Served]:
    async with FakeAutoscaler(keypair.pem) as autoscaler:
        environ = {
            "REPORT_ADDR": autoscaler.url,
            "CONTAINER_ID": "9",
            "MASTER_TOKEN": TOKEN,
            "UNSECURED": "false",
            "WORKER_HOST": "127.0.0.1",
            "WORKER_PORT": "0",
            "PYWORKER_BODY_TIMEOUT": str(BODY_TIMEOUT),
            "PYWORKER_KEEPALIVE_TIMEOUT": str(KEEPALIVE_TIMEOUT),
            "PYWORKER_REPORT_INTERVAL": "0.1",
            "PYWORKER_GRACE": "0",
        }
        config = WorkerConfig.model_validate(
            {"model_server": {"base_url": model_server.url}, "routes": [{"path": "/echo"}]}
            | {"perf": 100.0, "max_body_size": 64 * 1024}
        )
        worker = compose_worker(config, Environment.from_env(environ))
        stop = asyncio.Event()
        serving = asyncio.create_task(serve(worker, "127.0.0.1", 0, stop))
        output: list[str] = []

        def side_port_known() -> bool:
            output.append(capsys.readouterr().out)
            assert not serving.done(), "".join(output)
            return SIDE_LINE.search("".join(output)) is not None

        await wait_until(side_port_known)
        await wait_until(lambda: worker.status.ready)
        match = SIDE_LINE.search("".join(output))
        assert match is not None
        async with aiohttp.ClientSession() as session:
            yield Served(worker, autoscaler, int(match.group(1)), session, output)
        stop.set()
        await asyncio.wait_for(serving, 10)


async def trickle(port: int, head: bytes, drip: bytes, interval: float) -> tuple[bytes, float]:
    """Send `head`, then `drip` every `interval` s; what came back before the server closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    started = time.monotonic()

    async def dripping() -> None:
        with contextlib.suppress(ConnectionError):
            while True:
                await asyncio.sleep(interval)
                writer.write(drip)
                await writer.drain()

    dripper = asyncio.create_task(dripping())
    try:
        answer = await asyncio.wait_for(read_to_close(reader), 10)
    finally:
        dripper.cancel()
        writer.close()
    return answer, time.monotonic() - started


async def read_to_close(reader: asyncio.StreamReader) -> bytes:
    received = b""
    with contextlib.suppress(ConnectionError):
        while chunk := await reader.read(65536):
            received += chunk
    return received


async def exchange(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    try:
        return await asyncio.wait_for(read_to_close(reader), 10)
    finally:
        writer.close()


def slow_post(path: str, length: int = 10_000) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: worker\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n{{"
    ).encode()


# --- slow clients --------------------------------------------------------------------------------


async def test_a_body_trickled_slowly_is_cut_with_408(served: Served) -> None:
    answer, seconds = await trickle(served.port, slow_post("/echo"), b" ", 0.05)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"request body not received within 0.5 s" in answer
    assert BODY_TIMEOUT <= seconds < BODY_TIMEOUT + SLACK
    assert served.worker.ledger.interval().received == 0


async def test_a_chunked_body_trickled_slowly_is_cut_too(served: Served) -> None:
    head = b"POST /session/create HTTP/1.1\r\nHost: w\r\nTransfer-Encoding: chunked\r\n\r\n"
    answer, seconds = await trickle(served.port, head, b"1\r\n \r\n", 0.05)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert seconds < BODY_TIMEOUT + SLACK


async def test_the_side_port_cuts_slow_bodies(served: Served) -> None:
    answer, seconds = await trickle(served.side_port, slow_post("/session/end"), b" ", 0.05)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert seconds < BODY_TIMEOUT + SLACK


async def test_headers_that_never_end_are_cut_at_the_keepalive_timeout(served: Served) -> None:
    head = b"POST /echo HTTP/1.1\r\nHost: worker\r\nX-Slow: "
    answer, seconds = await trickle(served.port, head, b"a", 0.05)
    assert answer == b""
    assert KEEPALIVE_TIMEOUT <= seconds < KEEPALIVE_TIMEOUT + SLACK


async def test_an_idle_connection_is_closed(served: Served) -> None:
    for port in (served.port, served.side_port):
        answer, seconds = await trickle(port, b"", b"", 0.2)
        assert answer == b"" and seconds < KEEPALIVE_TIMEOUT + SLACK


async def test_a_client_that_sends_its_body_in_time_is_served(
    served: Served, keypair: KeyPair
) -> None:
    body = json.dumps(
        {"auth_data": keypair.auth_data(served.worker.url), "payload": {"n": 1}}
    ).encode()
    head = slow_post("/echo", len(body))[:-1]
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(head)
    for index in range(0, len(body), 200):  # in pieces, but well within the deadline
        writer.write(body[index : index + 200])
        await writer.drain()
    answer = await asyncio.wait_for(reader.readuntil(b"}}"), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200")


# --- oversized requests -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /health HTTP/1.1\r\nHost: w\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: w\r\n" + b"X-H: 1\r\n" * 100 + b"\r\n",
        b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: w\r\n\r\n",
    ],
    ids=["huge-header", "too-many-headers", "huge-request-line"],
)
async def test_oversized_request_heads_are_refused(served: Served, request_bytes: bytes) -> None:
    answer = await exchange(served.port, request_bytes)
    assert re.match(rb"HTTP/1\.[01] (400|431)", answer), answer[:100]


async def test_a_declared_or_streamed_body_over_the_limit_is_413(
    served: Served, keypair: KeyPair
) -> None:
    big = {"auth_data": keypair.auth_data(served.worker.url), "payload": {"x": "a" * 70_000}}
    assert (await served.post("/echo", big))[0] == 413

    async def stream() -> AsyncIterator[bytes]:
        for _ in range(80):
            yield b"a" * 1024

    status, _ = await served.post("/echo", None, data=stream())
    assert status == 413
    assert served.worker.ledger.interval().received == 0


# --- refusals leave no trace -----------------------------------------------------------------


async def test_refused_requests_change_neither_load_nor_request_ids(
    served: Served, keypair: KeyPair, model_server: ModelServer
) -> None:
    forged = keypair.auth_data(
        served.worker.url, request_idx=666, signature=KeyPair().sign("http://127.0.0.1:1")
    )
    assert (await served.post("/echo", {"auth_data": forged, "payload": {}}))[0] == 401
    assert (await served.post("/echo", {"auth_data": {"request_idx": 667}}))[0] == 422
    too_big = {
        "auth_data": keypair.auth_data(served.worker.url, request_idx=668),
        "payload": {"x": "a" * 70_000},
    }
    assert (await served.post("/echo", too_big))[0] == 413
    answer, _ = await trickle(served.port, slow_post("/echo"), b" ", 0.05)
    assert answer.startswith(b"HTTP/1.1 408")
    head = b"POST /echo HTTP/1.1\r\nHost: w\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n"
    assert (await exchange(served.port, head)).startswith(b"HTTP/1.0 400")
    forged_create = {"auth_data": forged, "payload": {"lifetime": 5}}
    assert (await served.post("/session/create", forged_create))[0] == 401
    ledger = served.worker.ledger
    assert ledger.interval().received == 0 and ledger.finished_waiting == 0
    assert ledger.totals == dict.fromkeys(ledger.totals, 0)
    assert model_server.recorder.payloads == []

    good = {"auth_data": keypair.auth_data(served.worker.url, request_idx=42), "payload": {"n": 1}}
    assert (await served.post("/echo", good))[0] == 200
    autoscaler = served.autoscaler
    await wait_until(lambda: bool(autoscaler.delete_requests))
    await wait_until(lambda: any(r["num_requests_recieved"] for r in autoscaler.worker_status))
    reported = [
        item["request_idx"] for post in autoscaler.delete_requests for item in post["requests"]
    ]
    assert reported == [42]
    assert sum(r["num_requests_recieved"] for r in autoscaler.worker_status) == 1
    assert sum(r["rej_load"] for r in autoscaler.worker_status) == 0
    assert all(not r["working_request_idxs"] for r in autoscaler.worker_status)


async def test_logs_hold_no_payload_signature_or_token(
    served: Served, keypair: KeyPair, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    payload_secret = "payload-secret-5c1f"
    header_secret = "Bearer header-secret-9a2e"
    good = keypair.auth_data(served.worker.url, request_idx=1)
    forged = keypair.auth_data(
        served.worker.url, request_idx=2, signature=KeyPair().sign("http://127.0.0.1:1")
    )
    bodies = [
        {"auth_data": good, "payload": {"prompt": payload_secret}},
        {"auth_data": forged, "payload": {"prompt": payload_secret}},
        {"auth_data": {**good, "reqnum": "x"}, "payload": {"prompt": payload_secret}},
        {"auth_data": good, "payload": {"prompt": payload_secret, "status": 500}},
        {"auth_data": good, "payload": {"lifetime": "forever", "x": payload_secret}},
    ]
    for body in bodies:
        await served.post("/echo", body)
        await served.post("/session/create", body)
    # aiohttp's own report of this would quote the start of the oversized header: the secret.
    oversized = f"Authorization: {header_secret}{'a' * 9000}"
    head = f"POST /echo HTTP/1.1\r\nHost: w\r\n{oversized}\r\n\r\n".encode()
    assert (await exchange(served.port, head)).startswith(b"HTTP/1.0 400")
    await trickle(served.port, slow_post("/echo") + payload_secret.encode(), b" ", 0.05)
    await wait_until(lambda: bool(served.autoscaler.delete_requests))
    await wait_until(lambda: any(r.name == "pyworker.http" for r in caplog.records))
    secrets = [payload_secret, "header-secret", TOKEN, good["signature"], forged["signature"]]
    secrets += [good["signature"][:40], forged["signature"][:40]]
    text = caplog.text
    for secret in secrets:
        assert secret not in text, secret
