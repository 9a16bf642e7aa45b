"""The pool's cap on open connections: a model server with a thread per connection (llama.cpp)
serves no more connections than it has threads, and a request written into one past them
waits while the others go on. At the cap a request waits for the first connection to come
free, in order of arrival, never longer than its read timeout; a GET (a health check) never
waits. The model server here answers each request when the test says.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from pyworker.upstream.errors import ConnectFailed, Disconnected, ReadTimedOut
from pyworker.upstream.model import ModelClient
from tests.conftest import wait_until
from tests.upstream.conftest import Started
from tests.upstream.test_pool import Exchange, ScriptedServer, answer, pool_of


class HeldServer(ScriptedServer):
    """Answers a request only once the test lets it (`answer_next`), in order of arrival."""

    def __init__(self, close_after: bool = False) -> None:
        super().__init__(self._hold)
        self.turns: asyncio.Queue[None] = asyncio.Queue()
        self.close_after = close_after
        self.open = 0
        self.most_open = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            await super()._serve(reader, writer)
        finally:
            self.open -= 1

    async def _hold(self, exchange: Exchange) -> bool:
        await self.turns.get()
        headers = ("Connection: close",) if self.close_after else ()
        await exchange.send(answer(exchange.body, *headers))
        return not self.close_after

    def answer_next(self) -> None:
        self.turns.put_nowait(None)


Held = Callable[..., Awaitable[tuple[HeldServer, str]]]
"""Starts a `HeldServer` (`close_after` its answers or not): the server and its URL."""
Capped = Callable[[str, int], ModelClient]
"""A model client of a URL whose pool holds at most so many connections."""


@pytest.fixture
def held(started: Started) -> Held:
    return lambda close_after=False: started.start(HeldServer(close_after))


@pytest.fixture
async def capped() -> AsyncIterator[Capped]:
    made: list[ModelClient] = []

    def make(base_url: str, limit: int) -> ModelClient:
        model = ModelClient(base_url, connect_timeout=2.0, max_connections=limit)
        made.append(model)
        return model

    yield make
    for model in made:
        await model.close()


async def post(model: ModelClient, body: bytes, read_timeout: float | None = None) -> bytes:
    async with model.post("/", body, read_timeout) as upstream:
        return await upstream.read()


async def one_busy(
    held: Held, capped: Capped, body: bytes
) -> tuple[HeldServer, ModelClient, asyncio.Task[bytes]]:
    """A model client capped at one connection, that one busy with a request of `body`."""
    server, url = await held()
    model = capped(url, 1)
    busy = asyncio.create_task(post(model, body))
    await wait_until(lambda: len(server.requests) == 1)
    return server, model, busy


async def test_at_the_cap_requests_wait_their_turn_on_the_connections_there_are(
    held: Held, capped: Capped
) -> None:
    server, url = await held()
    model = capped(url, 2)
    pool = pool_of(model)
    tasks = []
    for number in range(6):  # started one after the other: their order of arrival is known
        tasks.append(asyncio.create_task(post(model, b"%d" % number)))
        await wait_until(lambda: len(server.requests) + pool.waiting == len(tasks))
    assert len(server.requests) == 2 and pool.waiting == 4
    for _ in range(6):
        server.answer_next()
    assert await asyncio.gather(*tasks) == [b"%d" % number for number in range(6)]
    assert [exchange.body for exchange in server.requests] == [b"%d" % n for n in range(6)]
    assert server.connections == 2 and server.most_open == 2
    assert pool.idle == 2 and pool.waiting == 0


async def test_a_wait_ends_at_the_read_timeout_or_with_its_client_and_the_next_goes_on(
    held: Held, capped: Capped
) -> None:
    server, model, first = await one_busy(held, capped, b"first")
    pool = pool_of(model)
    cancelled = asyncio.create_task(post(model, b"cancelled"))
    last = asyncio.create_task(post(model, b"last"))
    await wait_until(lambda: pool.waiting == 2)
    with pytest.raises(ReadTimedOut) as raised:
        await post(model, b"timed", read_timeout=0.2)
    assert raised.value.status == 504 and "came free" in raised.value.message
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    server.answer_next()
    assert await first == b"first"
    await wait_until(lambda: len(server.requests) == 2)
    server.answer_next()
    assert await last == b"last"
    assert [exchange.body for exchange in server.requests] == [b"first", b"last"]
    assert server.connections == 1 and pool.waiting == 0


async def test_a_connection_that_closes_leaves_its_place_to_the_next_in_line(
    held: Held, capped: Capped
) -> None:
    server, url = await held(close_after=True)
    model = capped(url, 1)
    tasks = [asyncio.create_task(post(model, b"%d" % number)) for number in range(3)]
    for arrived in range(1, 4):
        await wait_until(lambda arrived=arrived: len(server.requests) == arrived)  # type: ignore[misc]
        server.answer_next()
    assert await asyncio.gather(*tasks) == [b"0", b"1", b"2"]
    assert server.connections == 3 and server.most_open == 1


async def test_a_get_never_waits_at_the_cap_and_leaves_no_connection_over_it(
    held: Held, capped: Capped
) -> None:
    server, model, busy = await one_busy(held, capped, b"busy")
    pool = pool_of(model)

    async def health() -> int:
        async with model.get("/health") as upstream:
            await upstream.read()
            return upstream.status

    checked = asyncio.create_task(health())
    await wait_until(lambda: len(server.requests) == 2)  # beside the busy one, not after it
    server.answer_next()
    server.answer_next()
    assert await checked == 200 and await busy == b"busy"
    assert server.connections == 2 and pool.idle == 1  # the one over the cap was closed


async def test_the_configured_cap_holds_over_the_engines_and_closing_ends_every_wait(
    held: Held,
) -> None:
    _server, url = await held()
    model = ModelClient(url, connect_timeout=2.0, max_connections=1)
    assert not model.limit_connections(8) and model.max_connections == 1
    unset = ModelClient(url, connect_timeout=2.0)
    assert unset.max_connections is None
    assert unset.limit_connections(3) and unset.max_connections == 3
    await unset.close()
    first = asyncio.create_task(post(model, b"first"))
    waiting = asyncio.create_task(post(model, b"waiting"))
    await wait_until(lambda: pool_of(model).waiting == 1)
    await model.close()
    with pytest.raises(ConnectFailed):
        await waiting
    with pytest.raises(Disconnected):  # its connection was closed under it
        await first


async def test_a_cap_that_grows_lets_the_first_in_line_connect_at_once(
    held: Held, capped: Capped
) -> None:
    server, url = await held()
    model = capped(url, 1)
    tasks = [asyncio.create_task(post(model, b"%d" % number)) for number in range(4)]
    await wait_until(lambda: len(server.requests) == 1 and pool_of(model).waiting == 3)
    pool_of(model).limit(3)  # what the engine declared, read after the first requests
    await wait_until(lambda: len(server.requests) == 3)
    for _ in range(4):
        server.answer_next()
    assert sorted(await asyncio.gather(*tasks)) == [b"0", b"1", b"2", b"3"]
    assert server.most_open == 3
