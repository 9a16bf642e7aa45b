"""The real client, vastai's `Serverless` and `CoroutineServerless`, against a real `pyworker dev`
process in its default mode (strict signatures: each auth_data accepted once).

A session is the case strict mode must not break: the client sends the session's auth_data,
the one `/session/create` used up, with every request made in the session. The worker accepts
it for that session while the session lives, and nowhere else: outside the session, on
another session or after the session ended it is a replay (401).
"""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

pytest.importorskip(
    "vastai", reason="Vast's SDK (the `sdk` extra) is not installed: scripts/test's lowest run"
)
from vastai.serverless.client import CoroutineServerless, Endpoint, Serverless
from vastai.serverless.client.session import Session

from pyworker.devtools.commands.dev.state import STATE_FILE, DevState, read_state

API_KEY = "local-test-key"
ENDPOINT = "hello_world"
COMPLETION = {"prompt": "hello", "max_tokens": 5}
STARTUP_TIMEOUT = 90.0


class OfflineServerless(Serverless):  # type: ignore[misc]  # vastai is untyped
    """`Serverless` without its download of Vast.ai's root certificate (plain HTTP here)."""

    _ssl_context: ssl.SSLContext | None

    async def get_ssl_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context


class OfflineCoroutineServerless(CoroutineServerless):  # type: ignore[misc]  # vastai is untyped
    _ssl_context: ssl.SSLContext | None

    async def get_ssl_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context


@dataclass(frozen=True)
class Dev:
    state: DevState
    output: Path

    @property
    def autoscaler(self) -> str:
        return self.state.autoscaler


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dev]:
    """`pyworker dev` (strict by default) running until the module's tests are done."""
    folder = tmp_path_factory.mktemp("dev")
    output = folder / "dev.out"
    environ = {
        key: value
        for key, value in os.environ.items()
        if key not in ("REPORT_ADDR", "CONTAINER_ID", "MODEL_SERVER_URL", "MODEL_LOG")
        and not key.startswith("PYWORKER_")
    }
    environ["XDG_RUNTIME_DIR"] = str(folder / "runtime")
    with output.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "pyworker", "dev", "--demo-load-seconds", "0.3",
             "--demo-tokens-per-second", "0"],
            cwd=folder, env=environ, stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        state = _wait_ready(process, folder / ".pyworker" / STATE_FILE, output)
        yield Dev(state, output)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _wait_ready(process: subprocess.Popen[bytes], path: Path, output: Path) -> DevState:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        state = read_state(path)
        if state is not None and state.ready:
            return state
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"pyworker dev did not get ready:\n{output.read_text()}")
        time.sleep(0.05)  # a poll with a deadline: the state file is the only signal


def endpoint_of(client: Any) -> Endpoint:
    return Endpoint(client, name=ENDPOINT, id=1, api_key=API_KEY)


async def post(url: str, body: Any) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(url, json=body, timeout=aiohttp.ClientTimeout(total=30)) as response,
    ):
        return response.status, await response.json(content_type=None)


def session_body(session: Session, payload: Any, session_id: str | None) -> dict[str, Any]:
    return {"auth_data": session.auth_data, "payload": payload, "session_id": session_id}


# --- plain requests -------------------------------------------------------------------------
async def test_plain_and_streamed_requests_of_serverless(dev: Dev) -> None:
    async with OfflineServerless(api_key=API_KEY, autoscaler_url=dev.autoscaler) as client:
        endpoint = endpoint_of(client)
        result = await asyncio.wait_for(endpoint.request("/v1/completions", COMPLETION, cost=5), 30)
        assert result["ok"] is True and result["status"] == 200, result
        assert result["response"]["usage"]["completion_tokens"] == 5
        assert result["auth_data"]["strict_signature"]  # signed strictly, verified strictly

        streamed = await asyncio.wait_for(
            endpoint.request("/v1/completions", {**COMPLETION, "stream": True}, stream=True), 30
        )
        assert streamed["ok"] is True and streamed["status"] == 200, streamed
        chunks = [chunk async for chunk in streamed["response"]]
    text = "".join(chunk["choices"][0]["text"] for chunk in chunks if chunk.get("choices"))
    assert len(text.split()) == 5


async def test_coroutine_serverless_plain_and_streamed(dev: Dev) -> None:
    async with OfflineCoroutineServerless(api_key=API_KEY, autoscaler_url=dev.autoscaler) as client:
        endpoint = endpoint_of(client)
        result = await asyncio.wait_for(endpoint.request("/v1/completions", COMPLETION, cost=5), 30)
        assert result["ok"] is True and result["status"] == 200, result
        assert result["response"]["object"] == "text_completion"
        streamed = await asyncio.wait_for(
            endpoint.request("/v1/completions", {**COMPLETION, "stream": True}, stream=True), 30
        )
        assert streamed["status"] == 200, streamed
        chunks = [chunk async for chunk in streamed["response"]]
    assert any(chunk.get("choices") for chunk in chunks)


# --- sessions -------------------------------------------------------------------------------
@pytest.mark.parametrize("client_class", [OfflineServerless, OfflineCoroutineServerless])
async def test_a_session_create_requests_stream_get_and_close(
    dev: Dev, client_class: type[Any]
) -> None:
    async with client_class(api_key=API_KEY, autoscaler_url=dev.autoscaler) as client:
        endpoint = endpoint_of(client)
        session = await asyncio.wait_for(endpoint.session(cost=10, lifetime=60), 30)
        assert session.open and session.url == dev.state.worker_url
        assert session.auth_data["strict_signature"]

        # Every request in the session carries the auth_data /session/create used up.
        for _ in range(3):
            result = await asyncio.wait_for(session.request("/v1/completions", COMPLETION), 30)
            assert result["status"] == 200, result
            assert result["response"]["usage"]["completion_tokens"] == 5
        streamed = await asyncio.wait_for(
            session.request("/v1/completions", {**COMPLETION, "stream": True}, stream=True), 30
        )
        assert streamed["status"] == 200, streamed
        chunks = [chunk async for chunk in streamed["response"]]
        assert any(chunk.get("choices") for chunk in chunks)

        found = await asyncio.wait_for(
            endpoint.get_session(session.session_id, session.auth_data), 30
        )
        assert found.session_id == session.session_id and found.url == session.url
        assert await session.is_open() is True
        # The session as /session/get gave it back works as well as the one created.
        again = await asyncio.wait_for(found.request("/v1/completions", COMPLETION), 30)
        assert again["status"] == 200, again

        await asyncio.wait_for(session.close(), 30)
        assert session.open is False

    # Ended: its auth_data is spent, in the session or out of it.
    url = session.url + "/v1/completions"
    status, answer = await post(url, session_body(session, COMPLETION, session.session_id))
    assert (status, answer) == (401, {"error": "auth_data already used"})
    status, answer = await post(
        session.url + "/session/get",
        {"session_id": session.session_id, "session_auth": session.auth_data},
    )
    assert status == 400


async def test_a_session_auth_data_is_refused_outside_its_session_and_on_another(
    dev: Dev,
) -> None:
    async with OfflineServerless(api_key=API_KEY, autoscaler_url=dev.autoscaler) as client:
        endpoint = endpoint_of(client)
        first = await asyncio.wait_for(endpoint.session(cost=10, lifetime=60), 30)
        second = await asyncio.wait_for(endpoint.session(cost=10, lifetime=60), 30)
        url = first.url + "/v1/completions"

        outside = await post(url, session_body(first, COMPLETION, None))
        assert outside == (401, {"error": "auth_data already used"})
        crossed = await post(url, session_body(first, COMPLETION, second.session_id))
        assert crossed == (401, {"error": "auth_data already used"})
        # Each session still serves its own.
        for session in (first, second):
            status, answer = await post(url, session_body(session, COMPLETION, session.session_id))
            assert status == 200, answer
        await first.close()
        await second.close()
