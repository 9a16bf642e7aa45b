"""What a stranger sees: the state and readiness; the details only with MASTER_TOKEN."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from pyworker.config import WorkerConfig
from pyworker.config.environment import Environment
from pyworker.lifecycle.state import WorkerState
from pyworker.serving.compose import compose_worker
from pyworker.serving.server import RUNNER_OPTIONS
from tests.conftest import MASTER_TOKEN, OPERATOR_HEADERS, ModelServer, WorkerFactory, wait_until

SECRET_LINE = "FATAL: engine died on prompt 'my-credit-card-4111'"
DETAIL_ROUTES = ("/status", "/ready", "/metrics")


@pytest.fixture
async def errored(
    start_worker: WorkerFactory, model_server: ModelServer, tmp_path: Path
) -> AsyncIterator[str]:
    """A worker on the platform (REPORT_ADDR, MASTER_TOKEN) errored by a log line with user data."""
    log = tmp_path / "model.log"
    log.write_text("model loaded\n")
    running = await start_worker(
        model_server={
            "base_url": model_server.url,
            "log_file": str(log),
            "load_patterns": ["model loaded"],
            "error_patterns": ["FATAL"],
        }
    )
    with log.open("a") as file:
        file.write(SECRET_LINE + "\n")
    await wait_until(lambda: running.worker.status.state is WorkerState.ERRORED)
    yield running.url


async def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        return response.status, response.content_type, await response.read()


async def test_a_stranger_sees_the_state_and_readiness_only(errored: str) -> None:
    status, _, body = await get(errored + "/status")
    assert (status, orjson.loads(body)) == (200, {"state": "errored", "ready": False})
    status, _, body = await get(errored + "/ready")
    assert (status, orjson.loads(body)) == (503, {"ready": False, "state": "errored"})
    status, kind, body = await get(errored + "/metrics")
    assert (status, kind) == (401, "application/json")
    assert "MASTER_TOKEN" in orjson.loads(body)["error"]
    for route in DETAIL_ROUTES:
        _, _, body = await get(errored + route)
        assert b"my-credit-card" not in body and b"127.0.0.1" not in body


async def test_the_token_holder_sees_everything(errored: str) -> None:
    status, _, body = await get(errored + "/status", OPERATOR_HEADERS)
    document = orjson.loads(body)
    assert status == 200
    assert "my-credit-card-4111" in document["error_msg"]
    assert document["reporter"]["addresses"][0].startswith("http://127.0.0.1:")
    assert document["state"] == "errored" and document["ready"] is False
    status, _, body = await get(errored + "/ready", OPERATOR_HEADERS)
    assert status == 503 and "my-credit-card-4111" in orjson.loads(body)["error"]
    status, kind, body = await get(errored + "/metrics", OPERATOR_HEADERS)
    assert (status, kind) == (200, "text/plain")
    assert b'pyworker_state{state="errored"} 1' in body


@pytest.mark.parametrize(
    "authorization",
    ["Bearer wrong", f"Bearer {MASTER_TOKEN}x", "Bearer", f"Basic {MASTER_TOKEN}", ""],
)
async def test_a_wrong_token_is_a_json_401_on_every_detail_route(
    errored: str, authorization: str
) -> None:
    for route in DETAIL_ROUTES:
        status, kind, body = await get(errored + route, {"Authorization": authorization})
        assert (status, kind) == (401, "application/json"), route
        assert orjson.loads(body) == {"error": "invalid token"}
        assert b"my-credit-card" not in body


async def raw_request(
    url: str, path: str, header: bytes, method: bytes = b"GET"
) -> tuple[int, bytes]:
    """A request whose Authorization header is not UTF-8, which no HTTP client library sends."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            method + b" " + path.encode() + b" HTTP/1.1\r\nHost: worker\r\nConnection: close\r\n"
            b"Content-Length: 0\r\nAuthorization: " + header + b"\r\n\r\n"
        )
        answer = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.parametrize(
    "header", [b"Bearer \xff\xfe\xfd", b"\xc3\x28", b"Bearer " + bytes(range(128, 256))]
)
async def test_a_non_utf8_token_is_a_json_401_never_a_500(errored: str, header: bytes) -> None:
    for route in DETAIL_ROUTES:
        status, body = await raw_request(errored, route, header)
        assert status == 401, route
        assert orjson.loads(body) == {"error": "invalid token"}
    # The same on /pyworker/update (POST), and the worker keeps serving the right token.
    status, body = await raw_request(errored, "/pyworker/update", header, b"POST")
    assert (status, orjson.loads(body)) == (401, {"error": "invalid token"})
    status, _, body = await get(errored + "/status", OPERATOR_HEADERS)
    assert status == 200 and orjson.loads(body)["state"] == "errored"


StartLocal = Callable[..., Awaitable[str]]


@pytest.fixture
async def start_bare(model_server: ModelServer) -> AsyncIterator[StartLocal]:
    """A worker built from exactly the environment given."""
    servers: list[TestServer] = []

    async def start(**environ: str) -> str:
        raw: dict[str, Any] = {
            "model_server": {"base_url": model_server.url},
            "routes": [{"path": "/echo"}],
            "perf": 10,
        }
        worker = compose_worker(WorkerConfig.model_validate(raw), Environment.from_env(environ))
        worker.reporter.addresses = ()
        server = TestServer(worker.create_app(), host="127.0.0.1", **RUNNER_OPTIONS)
        await server.start_server()
        servers.append(server)
        await wait_until(lambda: worker.status.ready)
        return str(server.make_url("")).rstrip("/")

    yield start
    for server in servers:
        await server.close()


async def test_without_a_token_on_the_platform_the_details_are_served_to_nobody(
    start_bare: StartLocal,
) -> None:
    url = await start_bare(REPORT_ADDR="http://127.0.0.1:9", CONTAINER_ID="3", UNSECURED="true")
    status, _, body = await get(url + "/status")
    assert (status, orjson.loads(body)) == (200, {"state": "ready", "ready": True})
    status, _, body = await get(url + "/status", {"Authorization": "Bearer anything"})
    assert status == 403 and "MASTER_TOKEN is not set" in orjson.loads(body)["error"]


async def test_local_mode_without_a_token_shows_the_details(start_bare: StartLocal) -> None:
    url = await start_bare()  # no CONTAINER_ID, no REPORT_ADDR: loopback only
    status, _, body = await get(url + "/status")
    assert status == 200 and "routes" in orjson.loads(body)
    status, _, _ = await get(url + "/metrics")
    assert status == 200


async def test_local_mode_with_a_token_asks_for_it(start_bare: StartLocal) -> None:
    url = await start_bare(MASTER_TOKEN="local-secret")
    status, _, body = await get(url + "/status")
    assert (status, orjson.loads(body)) == (200, {"state": "ready", "ready": True})
    status, _, body = await get(url + "/status", {"Authorization": "Bearer local-secret"})
    assert status == 200 and "routes" in orjson.loads(body)
