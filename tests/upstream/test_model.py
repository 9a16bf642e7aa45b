"""The model-server facade against a real model server on a loopback socket."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from pyworker.config import HandlerResult, JSONObject, ModelHandler
from pyworker.upstream.errors import (
    BadAnswer,
    ConnectFailed,
    Disconnected,
    ReadTimedOut,
    UpstreamError,
)
from pyworker.upstream.model import ModelClient


class Model:
    """A model server that answers JSON, streams, a health path and a silent path."""

    def __init__(self) -> None:
        self.received: list[tuple[str, bytes]] = []
        self.healthy = 200
        self.second_chunk = asyncio.Event()
        self.silent_arrived = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/echo", self.echo)
        app.router.add_post("/stream", self.stream)
        app.router.add_post("/silent", self.silent)
        app.router.add_get("/silent", self.silent)
        app.router.add_get("/health", self.health)
        app.router.add_post("/closed", self.closed)
        app.router.add_post("/drop", self.drop)
        return app

    async def echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.received.append((request.path, body))
        return web.json_response({"got": orjson.loads(body)}, headers={"X-Model": "m"})

    async def stream(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: 1\n\n")
        await self.second_chunk.wait()
        await response.write(b"data: 2\n\n")
        await response.write_eof()
        return response

    async def silent(self, request: web.Request) -> web.Response:
        self.silent_arrived.set()
        await asyncio.sleep(30)
        return web.Response()

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=self.healthy, text="state")

    async def drop(self, request: web.Request) -> web.Response:
        assert request.transport is not None
        request.transport.close()  # no answer at all
        await asyncio.sleep(30)
        return web.Response()

    async def closed(self, request: web.Request) -> web.Response:
        self.received.append((request.path, await request.read()))
        return web.Response(status=404, text="no such route")


@pytest.fixture
async def model() -> AsyncIterator[Model]:
    yield Model()


@pytest.fixture
async def client(model: Model) -> AsyncIterator[ModelClient]:
    server = TestServer(model.app(), host="127.0.0.1")
    await server.start_server()
    model_client = ModelClient(str(server.make_url("")).rstrip("/"), connect_timeout=2.0)
    yield model_client
    model.second_chunk.set()
    await model_client.close()
    await server.close()


async def test_a_post_gives_the_answer_status_headers_and_body(
    client: ModelClient, model: Model
) -> None:
    async with client.post("/echo", b'{"x": 1}') as answer:
        assert answer.status == 200
        assert answer.content_type == "application/json"
        assert ("X-Model", "m") in answer.headers
        body = await answer.read()
    assert answer.content_length == len(body)
    assert orjson.loads(body) == {"got": {"x": 1}}
    assert model.received == [("/echo", b'{"x": 1}')]


async def test_a_stream_arrives_chunk_by_chunk(client: ModelClient, model: Model) -> None:
    async with client.post("/stream", b"{}") as answer:
        assert answer.content_type == "text/event-stream"
        assert answer.content_length is None
        assert await answer.next_chunk() == b"data: 1\n\n"  # before the model sends the next
        model.second_chunk.set()
        rest = b""
        while chunk := await answer.next_chunk():
            rest += chunk
    assert rest == b"data: 2\n\n"


async def test_the_health_probe_gives_the_status(client: ModelClient, model: Model) -> None:
    assert await client.probe("/health", timeout=2.0) == 200
    model.healthy = 503
    assert await client.probe("/health", timeout=2.0) == 503


async def test_a_health_probe_without_answer_is_an_upstream_error(
    client: ModelClient, refused_port: int
) -> None:
    with pytest.raises(UpstreamError) as timed_out:
        await client.probe("/silent", timeout=0.2)
    assert timed_out.value.status == 504
    unreachable = ModelClient(f"http://127.0.0.1:{refused_port}", connect_timeout=2.0)
    with pytest.raises(UpstreamError) as refused:
        await unreachable.probe("/health", timeout=2.0)
    assert refused.value.status == 502
    assert refused.value.message.startswith("model server unreachable")
    await unreachable.close()


async def test_notify_delivers_the_body_and_gives_the_status(
    client: ModelClient, model: Model
) -> None:
    assert await client.notify("/closed", b'{"session_id": "s"}', timeout=2.0) == 404
    assert model.received == [("/closed", b'{"session_id": "s"}')]
    with pytest.raises(UpstreamError) as timed_out:
        await client.notify("/silent", b"{}", timeout=0.2)
    assert timed_out.value.status == 504


async def test_a_refused_connection_is_a_502(client: ModelClient, refused_port: int) -> None:
    unreachable = ModelClient(f"http://127.0.0.1:{refused_port}", connect_timeout=2.0)
    with pytest.raises(ConnectFailed):
        async with unreachable.post("/echo", b"{}"):
            pass
    with pytest.raises(UpstreamError) as refused:
        async with unreachable.post("/echo", b"{}"):
            pass
    assert refused.value.status == 502
    await unreachable.close()


async def test_silence_past_the_read_timeout_is_a_504(client: ModelClient) -> None:
    with pytest.raises(ReadTimedOut):
        async with client.post("/silent", b"{}", read_timeout=0.2):
            pass
    with pytest.raises(UpstreamError) as timed_out:
        async with client.post("/silent", b"{}", read_timeout=0.2):
            pass
    assert timed_out.value.status == 504


async def test_a_handler_gets_a_session_to_the_model_and_is_bounded(
    client: ModelClient, model: Model
) -> None:
    async def handler(
        session: aiohttp.ClientSession, base_url: str, payload: JSONObject
    ) -> HandlerResult:
        async with session.post(base_url + "/echo", json=payload) as response:
            return HandlerResult(response.status, await response.read())

    result = await client.call_handler(handler, {"y": 2}, timeout=2.0)
    assert result.status == 200 and orjson.loads(result.body) == {"got": {"y": 2}}

    async def slow(
        session: aiohttp.ClientSession, base_url: str, payload: JSONObject
    ) -> HandlerResult:
        async with session.post(base_url + "/silent", json=payload) as response:
            return HandlerResult(response.status, await response.read())

    with pytest.raises(UpstreamError) as timed_out:
        await client.call_handler(slow, {}, timeout=0.2)
    assert timed_out.value.status == 504


async def test_close_fails_a_request_still_running(client: ModelClient, model: Model) -> None:
    async def waiting() -> None:
        async with client.post("/silent", b"{}"):
            pass

    task = asyncio.create_task(waiting())
    await asyncio.wait_for(model.silent_arrived.wait(), 10)
    await client.close()
    with pytest.raises(UpstreamError) as failed:
        await asyncio.wait_for(task, 2)
    assert failed.value.status == 502


async def test_a_handler_s_session_failures_are_upstream_errors(
    client: ModelClient, refused_port: int
) -> None:
    """The client is told what it is told for the pool's own failures; a handler's own bug
    goes through as it is."""

    def calling(url: str, check: bool = False) -> ModelHandler:
        async def handler(
            session: aiohttp.ClientSession, base_url: str, payload: JSONObject
        ) -> HandlerResult:
            async with session.post(url.format(base_url=base_url), json=payload) as response:
                if check:
                    response.raise_for_status()
                return HandlerResult(response.status, await response.read())

        return handler

    with pytest.raises(ConnectFailed) as refused:
        await client.call_handler(calling(f"http://127.0.0.1:{refused_port}/"), {}, 2.0)
    assert refused.value.status == 502
    assert refused.value.message.startswith("model server unreachable: ")
    with pytest.raises(Disconnected) as dropped:
        await client.call_handler(calling("{base_url}/drop"), {}, 5.0)
    assert (dropped.value.status, dropped.value.message) == (
        502,
        "model server failed: ServerDisconnectedError",
    )
    with pytest.raises(BadAnswer) as refused_answer:
        await client.call_handler(calling("{base_url}/closed", check=True), {}, 5.0)
    assert refused_answer.value.message == "model server failed: ClientResponseError"

    async def buggy(
        session: aiohttp.ClientSession, base_url: str, payload: JSONObject
    ) -> HandlerResult:
        return HandlerResult(200, orjson.dumps(payload["missing"]))

    with pytest.raises(KeyError):
        await client.call_handler(buggy, {}, 2.0)


async def test_each_failure_says_what_the_client_is_told(client: ModelClient) -> None:
    with pytest.raises(ReadTimedOut) as timed_out:
        async with client.post("/silent", b"{}", read_timeout=0.2):
            pass
    assert (timed_out.value.status, timed_out.value.message) == (504, "model server timed out")
    async with client.post("/stream", b"{}") as answer:
        await client.close()  # the worker's own close cuts the answer
        with pytest.raises(Disconnected) as cut:
            await answer.read()
    assert (cut.value.status, cut.value.message) == (
        502,
        "model server failed: connection closed by the worker",
    )
