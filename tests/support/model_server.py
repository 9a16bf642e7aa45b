"""A scriptable fake model server for tests: it records what it receives and when clients leave."""

from __future__ import annotations

import asyncio
import gzip
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler


@dataclass
class Recorder:
    payloads: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    order: list[Any] = field(default_factory=list)
    disconnects: int = 0
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    active: int = 0
    peak_active: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)
    healthy: bool = True
    clients: set[Any] = field(default_factory=set)
    """The (address, port) of every connection that sent a request: one per TCP connection."""


def create_app(recorder: Recorder) -> web.Application:
    async def record(request: web.Request) -> dict[str, Any]:
        payload: dict[str, Any] = await request.json()
        recorder.payloads.append(payload)
        recorder.headers.append(dict(request.headers))
        return payload

    async def echo(request: web.Request) -> web.Response:
        payload = await record(request)
        return web.json_response({"received": payload}, status=int(payload.get("status", 200)))

    async def slow(request: web.Request) -> web.Response:
        payload = await record(request)
        recorder.active += 1
        recorder.peak_active = max(recorder.peak_active, recorder.active)
        try:
            if payload.get("wait_release"):
                await recorder.release.wait()
            await asyncio.sleep(float(payload.get("seconds", 0)))
            recorder.order.append(payload.get("n"))
        except asyncio.CancelledError:
            recorder.disconnects += 1
            recorder.disconnected.set()
            raise
        finally:
            recorder.active -= 1
        return web.json_response({"done": payload.get("n")})

    async def stream(request: web.Request) -> web.StreamResponse:
        payload = await record(request)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for index in range(int(payload.get("chunks", 3))):
                await response.write(f"data: {index}\n\n".encode())
                if payload.get("hold_after_first") and index == 0:
                    await recorder.release.wait()
                await asyncio.sleep(float(payload.get("interval", 0)))
            if payload.get("die"):
                assert request.transport is not None
                request.transport.close()
                return response
            await response.write(b"data: [DONE]\n\n")
        except asyncio.CancelledError:
            recorder.disconnects += 1
            recorder.disconnected.set()
            raise
        await response.write_eof()
        return response

    async def compressed(request: web.Request) -> web.Response:
        await record(request)
        body = gzip.compress(b'{"zipped": true}')
        return web.Response(
            body=body,
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        )

    async def completions(request: web.Request) -> web.StreamResponse:
        """OpenAI-like: `produce` tokens, reported in usage; streamed as SSE on request."""
        payload = await record(request)
        produce = int(payload.get("produce", 1))
        usage = {"completion_tokens": produce}
        if not payload.get("stream"):
            await asyncio.sleep(float(payload.get("seconds", 0)))
            return web.json_response({"choices": [{"text": "x" * produce}], "usage": usage})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for _ in range(produce):
            await response.write(b'data: {"choices": [{"text": "x"}]}\n\n')
            await asyncio.sleep(float(payload.get("interval", 0)))
        last = json.dumps({"choices": [], "usage": usage}).encode()
        await response.write(b"data: " + last + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"ok": recorder.healthy}, status=200 if recorder.healthy else 503)

    @web.middleware
    async def count_connections(request: web.Request, handler: Handler) -> web.StreamResponse:
        transport = request.transport
        if transport is not None:
            recorder.clients.add(transport.get_extra_info("peername"))
        return await handler(request)

    app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[count_connections])
    app.router.add_post("/echo", echo)
    app.router.add_post("/slow", slow)
    app.router.add_post("/stream", stream)
    app.router.add_post("/compressed", compressed)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/health", health)
    return app
