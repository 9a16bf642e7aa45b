"""`POST /pyworker/update`: refused without MASTER_TOKEN, bearer checked, marker written."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from unittest import mock

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from pyworker.config import WorkerConfig
from pyworker.config.environment import Environment
from pyworker.serving.admin import bearer_token
from pyworker.serving.compose import compose_worker
from pyworker.serving.server import RUNNER_OPTIONS

TOKEN = "s3cret-master-token"
Start = Callable[..., Awaitable[str]]


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Start]:
    """Start a local worker with the given environment; returns its base URL."""
    servers: list[TestServer] = []

    async def run(**environ: str) -> str:
        config = WorkerConfig.model_validate({"routes": [{"path": "/echo"}]})
        environ.setdefault("PYWORKER_UPDATE_MARKER", str(tmp_path / "force_update"))
        worker = compose_worker(config, Environment.from_env(environ))
        server = TestServer(worker.create_app(), host="127.0.0.1", **RUNNER_OPTIONS)
        await server.start_server()
        servers.append(server)
        return str(server.make_url("/pyworker/update"))

    yield run
    for server in servers:
        await server.close()


async def post(url: str, authorization: str | None) -> tuple[int, dict[str, object]]:
    headers = {} if authorization is None else {"Authorization": authorization}
    async with aiohttp.ClientSession() as client, client.post(url, headers=headers) as response:
        return response.status, await response.json()


async def test_refused_when_master_token_is_unset(start: Start, tmp_path: Path) -> None:
    url = await start()
    for authorization in (None, "", "Bearer ", "Bearer anything"):
        status, answer = await post(url, authorization)
        assert status == 403
        assert "MASTER_TOKEN" in str(answer["error"])
    assert not (tmp_path / "force_update").exists()


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Bearer wrong",
        f"Bearer {TOKEN}x",
        f"Basic {TOKEN}",
        TOKEN[:-1],
    ],
)
async def test_a_wrong_token_is_401(
    start: Start, tmp_path: Path, authorization: str | None
) -> None:
    url = await start(MASTER_TOKEN=TOKEN)
    status, answer = await post(url, authorization)
    assert (status, answer) == (401, {"error": "invalid token"})
    assert not (tmp_path / "force_update").exists()


@pytest.mark.parametrize("authorization", [f"Bearer {TOKEN}", f"bearer  {TOKEN} ", TOKEN])
async def test_the_right_token_writes_the_marker(
    start: Start, tmp_path: Path, authorization: str
) -> None:
    url = await start(MASTER_TOKEN=TOKEN)
    assert await post(url, authorization) == (200, {"ok": True})
    assert (tmp_path / "force_update").read_text().strip().isdigit()


async def test_the_token_is_compared_in_constant_time(start: Start) -> None:
    url = await start(MASTER_TOKEN=TOKEN)
    with mock.patch(
        "pyworker.serving.access.hmac.compare_digest", wraps=hmac.compare_digest
    ) as compare:
        assert (await post(url, "Bearer guess"))[0] == 401
        assert (await post(url, f"Bearer {TOKEN}"))[0] == 200
    assert compare.call_count == 2


async def test_an_unwritable_marker_is_500(start: Start, tmp_path: Path) -> None:
    url = await start(
        MASTER_TOKEN=TOKEN, PYWORKER_UPDATE_MARKER=str(tmp_path / "missing" / "force_update")
    )
    status, answer = await post(url, f"Bearer {TOKEN}")
    assert status == 500 and answer == {"error": "cannot write the update marker"}


def test_bearer_token_parsing() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("  BEARER   abc  ") == "abc"
    assert bearer_token("abc") == "abc"
    assert bearer_token("") == ""
