"""Hosts on loopback for outbound calls: one that records all it gets, and answers to give.

host = await RecordingHost(redirect_to(lambda: other.url, 302)).start()
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.test_utils import TestServer

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class RecordingHost:
    """A server on loopback that records every request it gets and answers with `handler`."""

    handler: Handler
    requests: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)
    server: TestServer | None = None

    async def start(self) -> RecordingHost:
        async def record(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            self.requests.append((request.method, request.path, dict(request.headers), body))
            return await self.handler(request)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", record)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()


def redirect_to(target: Callable[[], str], status: int) -> Handler:
    async def redirect(request: web.Request) -> web.Response:
        return web.Response(status=status, headers={"Location": target() + request.path})

    return redirect


def endless(sent: list[int]) -> Handler:
    """A 200 whose body never ends; `sent` gets how many bytes went out before the reader left."""

    async def answer(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        total = 0
        try:
            while True:
                await response.write(b"-----BEGIN PUBLIC KEY-----\n" * 2048)
                total += 27 * 2048
        except (ConnectionError, RuntimeError):
            pass
        finally:  # the handler may be cancelled instead when the reader leaves
            sent.append(total)
        return response

    return answer


async def answer_ok(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


HostFactory = Callable[[Handler], Awaitable[RecordingHost]]
"""Starts a RecordingHost answering with a handler (the `hosts` fixture, tests/conftest.py)."""
