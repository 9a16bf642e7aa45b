"""Fixtures of the request path's tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, TypeVar

import pytest


class Server(Protocol):
    async def start(self) -> str: ...

    async def stop(self) -> None: ...


ServerT = TypeVar("ServerT", bound=Server)


class Started:
    """The test's own model servers, each stopped when the test ends."""

    def __init__(self) -> None:
        self.servers: list[Server] = []

    async def start(self, server: ServerT) -> tuple[ServerT, str]:
        self.servers.append(server)
        return server, await server.start()


@pytest.fixture
async def started() -> AsyncIterator[Started]:
    kept = Started()
    yield kept
    for server in kept.servers:
        await server.stop()
