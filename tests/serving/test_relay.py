"""Relaying the model server's answer to the client, both on real loopback sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from pyworker.config import HandlerResult, JSONObject, ResponseHook
from pyworker.serving.relay import relay, relay_handler
from pyworker.upstream.errors import UpstreamError
from pyworker.upstream.model import ModelClient


class Model:
    def __init__(self) -> None:
        self.second_chunk = asyncio.Event()
        self.break_stream = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/echo", self.echo)
        app.router.add_post("/stream", self.stream)
        app.router.add_post("/broken", self.broken)
        app.router.add_post("/silent", self.silent)
        return app

    async def echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        return web.Response(
            body=body,
            content_type="application/json",
            headers={"X-Model": "m", "Keep-Alive": "timeout=5", "Trailer": "x"},
        )

    async def stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: 1\n\n")
        await self.second_chunk.wait()
        await response.write(b"data: 2\n\n")
        await response.write_eof()
        return response

    async def broken(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: 1\n\n")
        await self.break_stream.wait()  # the first chunk reached the client
        assert request.transport is not None
        request.transport.abort()
        return response

    async def silent(self, request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.Response()


class Scene:
    """A model server, and a worker in front of it whose one route relays to `/<path>`."""

    def __init__(self) -> None:
        self.model = Model()
        self.statuses: list[int] = []
        self.hook: ResponseHook | None = None
        self.handler: Callable[..., Awaitable[HandlerResult]] | None = None
        self.client: ModelClient | None = None
        self.servers: list[TestServer] = []
        self.session: aiohttp.ClientSession | None = None
        self.url = ""

    async def start(self, base_url: str | None = None) -> str:
        model_url = base_url or await self._serve(self.model.app())
        self.client = ModelClient(model_url, connect_timeout=2.0)
        worker = web.Application()
        worker.router.add_post("/{path}", self.forward)
        self.url = await self._serve(worker)
        self.session = aiohttp.ClientSession()
        return self.url

    def post(self, path: str, body: bytes) -> Any:
        assert self.session is not None
        return self.session.post(self.url + path, data=body)

    async def _serve(self, app: web.Application) -> str:
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        self.servers.append(server)
        return str(server.make_url("")).rstrip("/")

    async def forward(self, request: web.Request) -> web.StreamResponse:
        assert self.client is not None
        body = await request.read()
        try:
            if self.handler is not None:
                payload = orjson.loads(body)
                relayed = await relay_handler(self.client, self.handler, payload, 0.5, self.hook)
            else:
                path = "/" + request.match_info["path"]
                relayed = await relay(self.client, request, path, body, 0.5, self.hook)
        except UpstreamError as error:
            return web.Response(status=error.status, text=error.message)
        self.statuses.append(relayed.http_status)
        return relayed.response

    async def close(self) -> None:
        self.model.second_chunk.set()
        if self.session is not None:
            await self.session.close()
        if self.client is not None:
            await self.client.close()
        for server in self.servers:
            await server.close()


@pytest.fixture
async def scene() -> AsyncIterator[Scene]:
    made = Scene()
    yield made
    await made.close()


async def test_a_json_answer_is_relayed_whole_without_hop_headers(scene: Scene) -> None:
    await scene.start()
    async with scene.post("/echo", b'{"x": 1}') as response:
        assert response.status == 200
        assert await response.read() == b'{"x": 1}'
        assert response.headers["X-Model"] == "m"
        assert response.headers["Content-Type"] == "application/json"
        assert "Keep-Alive" not in response.headers and "Trailer" not in response.headers
    assert scene.statuses == [200]


async def test_the_response_hook_changes_a_buffered_answer(scene: Scene) -> None:
    scene.hook = lambda status, body: body.replace(b"1", b"2")
    await scene.start()
    async with scene.post("/echo", b'{"x": 1}') as response:
        assert await response.read() == b'{"x": 2}'


async def test_a_stream_reaches_the_client_chunk_by_chunk(scene: Scene) -> None:
    await scene.start()
    async with scene.post("/stream", b"{}") as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        first = await response.content.readuntil(b"\n\n")
        assert first == b"data: 1\n\n"  # before the model sent the rest
        scene.model.second_chunk.set()
        assert await response.content.read() == b"data: 2\n\n"
    assert scene.statuses == [200]


async def test_a_stream_broken_after_its_headers_cuts_the_client(scene: Scene) -> None:
    await scene.start()
    async with scene.post("/broken", b"{}") as response:
        assert response.status == 200
        assert await response.content.readuntil(b"\n\n") == b"data: 1\n\n"
        scene.model.break_stream.set()
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    assert scene.statuses == [502]


async def test_a_model_server_that_refuses_is_a_502(scene: Scene, refused_port: int) -> None:
    await scene.start(f"http://127.0.0.1:{refused_port}")
    async with scene.post("/echo", b"{}") as response:
        assert response.status == 502
        assert (await response.text()).startswith("model server unreachable")


async def test_a_silent_model_server_is_a_504(scene: Scene) -> None:
    await scene.start()
    async with scene.post("/silent", b"{}") as response:
        assert response.status == 504
        assert await response.text() == "model server timed out"


async def test_a_handler_answer_is_relayed_with_its_type_and_the_hook(scene: Scene) -> None:
    async def handler(
        session: aiohttp.ClientSession, base_url: str, payload: JSONObject
    ) -> HandlerResult:
        async with session.post(base_url + "/echo", json=payload) as response:
            return HandlerResult(201, await response.read(), content_type="text/plain")

    scene.handler = handler
    scene.hook = lambda status, body: body + b"!"
    await scene.start()
    async with scene.post("/any", b'{"x":1}') as response:
        assert response.status == 201
        assert response.headers["Content-Type"] == "text/plain"
        body = await response.read()
    assert body.endswith(b"!") and orjson.loads(body[:-1]) == {"x": 1}
    assert scene.statuses == [201]
