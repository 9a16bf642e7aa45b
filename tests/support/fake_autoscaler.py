"""A recording autoscaler on loopback: what a worker or its start script tells the platform.

It accepts `POST /worker_status/` and `POST /delete_requests/`, keeping every body (a body that
is not JSON is kept in `invalid` and answered 400), and serves `GET /pubkey/` from a PEM.

    async with FakeAutoscaler(pem) as autoscaler:
        environ["REPORT_ADDR"] = autoscaler.url
        ...
        await autoscaler.wait_for_status()
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from pyworker.protocol.messages import DELETE_REQUESTS_PATH, PUBKEY_PATH, STATUS_PATH

Handler = Callable[[web.Request], Awaitable[web.Response]]


class FakeAutoscaler:
    def __init__(self, pem: bytes = b"") -> None:
        self.pem = pem
        self.worker_status: list[dict[str, Any]] = []
        self.delete_requests: list[dict[str, Any]] = []
        self.invalid: list[bytes] = []
        self.received = asyncio.Condition()
        self._server = TestServer(self._create_app(), host="127.0.0.1", port=0)

    @property
    def url(self) -> str:
        return str(self._server.make_url("")).rstrip("/")

    async def start(self) -> FakeAutoscaler:
        await self._server.start_server()
        return self

    async def close(self) -> None:
        await self._server.close()

    async def __aenter__(self) -> FakeAutoscaler:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def wait_for_status(self, count: int = 1, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Wait until `count` worker status reports arrived; return them all."""
        async with self.received:
            await asyncio.wait_for(
                self.received.wait_for(lambda: len(self.worker_status) >= count), timeout
            )
        return list(self.worker_status)

    async def wait_report(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        after: int = 0,
        timeout: float = 15.0,
    ) -> dict[str, Any]:
        """The first status report, among those after the `after`-th, that `predicate` accepts;
        woken by each report as it arrives."""

        def found() -> dict[str, Any] | None:
            return next((r for r in self.worker_status[after:] if predicate(r)), None)

        try:
            async with self.received:
                await asyncio.wait_for(self.received.wait_for(lambda: found() is not None), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"no such report among {self.worker_status[-3:]}") from None
        report = found()
        assert report is not None
        return report

    def _create_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(STATUS_PATH, self._recorder(self.worker_status))
        app.router.add_post(DELETE_REQUESTS_PATH, self._recorder(self.delete_requests))
        app.router.add_get(PUBKEY_PATH, self._pubkey)
        return app

    def _recorder(self, bodies: list[dict[str, Any]]) -> Handler:
        async def record(request: web.Request) -> web.Response:
            raw = await request.read()
            try:
                body = json.loads(raw)
            except ValueError:
                self.invalid.append(raw)
                return web.json_response({"error": "body is not JSON"}, status=400)
            async with self.received:
                bodies.append(body)
                self.received.notify_all()
            return web.json_response({"ok": True})

        return record

    async def _pubkey(self, request: web.Request) -> web.Response:
        return web.Response(body=self.pem, content_type="text/plain")
