"""The request path's HTTP/1.1 client, against model servers that answer scripted bytes.

Requests go through the facade (`ModelClient.post` and `get`), the pool under it read for what
only it knows.

Every test runs on the default asyncio loop and on uvloop (what `pyworker run` uses); see
`pytest_asyncio_loop_factories` in conftest.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from pyworker import backports
from pyworker.config.encoded_body import EncodedBody
from pyworker.upstream import connection
from pyworker.upstream.connection import HIGH_WATER
from pyworker.upstream.errors import BadAnswer, ConnectFailed, Disconnected, ReadTimedOut
from pyworker.upstream.model import ModelClient
from pyworker.upstream.pool import ConnectionPool
from tests.conftest import wait_until
from tests.upstream.conftest import Started

Script = Callable[["Exchange"], Awaitable[bool]]
"""Answers one request; returns whether to keep the connection open for the next one."""


class Exchange:
    def __init__(self, head: bytes, body: bytes, writer: asyncio.StreamWriter) -> None:
        self.head = head
        self.body = body
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()


class ScriptedServer:
    """A model server that reads whole requests and answers each as its script says."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.closed_by_peer = 0
        self.requests: list[Exchange] = []
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    self.closed_by_peer += 1
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                exchange = Exchange(head, await reader.readexactly(length), writer)
                self.requests.append(exchange)
                if not await self.script(exchange):
                    writer.close()
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            self.closed_by_peer += 1


def answer(body: bytes, *headers: str, status: str = "200 OK") -> bytes:
    lines = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


ServeFixture = Callable[[Script], Awaitable[tuple[ScriptedServer, str]]]


@pytest.fixture
def serve(started: Started) -> ServeFixture:
    return lambda script: started.start(ScriptedServer(script))


@pytest.fixture
async def models() -> AsyncIterator[Callable[..., ModelClient]]:
    made: list[ModelClient] = []

    def make(base_url: str, **options: float) -> ModelClient:
        model = ModelClient(base_url, connect_timeout=2.0)
        model._pool = ConnectionPool(base_url, 2.0, **options)  # type: ignore[arg-type]
        made.append(model)
        return model

    yield make
    for model in made:
        await model.close()


def pool_of(model: ModelClient) -> ConnectionPool:
    """The pool under the facade: what only it knows (connections opened, idle ones)."""
    return model._pool


ModelFixture = Callable[..., ModelClient]


async def test_sequential_requests_share_one_connection(
    serve: ServeFixture, models: ModelFixture
) -> None:
    async def script(exchange: Exchange) -> bool:
        await exchange.send(answer(b'{"echo": ' + exchange.body + b"}", "Content-Type: a/b"))
        return True

    server, url = await serve(script)
    model = models(url + "/v1")
    pool = pool_of(model)
    for number in range(3):
        body = b'{"n": %d}' % number
        async with model.post("/generate", body) as upstream:
            assert upstream.status == 200
            assert upstream.content_type == "a/b"
            assert ("Content-Type", "a/b") in upstream.headers
            assert await upstream.read() == b'{"echo": ' + body + b"}"
    assert server.connections == 1 and pool.opened == 1
    head = server.requests[0].head.decode()
    assert head.startswith("POST /v1/generate HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{url.rsplit(':', 1)[1]}\r\n" in head
    assert "Content-Type: application/json\r\n" in head
    assert "Accept-Encoding: identity\r\n" in head
    assert [exchange.body for exchange in server.requests] == [
        b'{"n": 0}',
        b'{"n": 1}',
        b'{"n": 2}',
    ]


@pytest.mark.parametrize("size", [0, 64 * 1024, 64 * 1024 + 1, 3 * 1024 * 1024])
async def test_bodies_of_any_size_arrive_whole(
    serve: ServeFixture, models: ModelFixture, size: int
) -> None:
    async def script(exchange: Exchange) -> bool:
        await exchange.send(answer(b"%d" % len(exchange.body)))
        return True

    server, url = await serve(script)
    body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    async with models(url).post("/", body) as upstream:
        assert await upstream.read() == b"%d" % size
    assert server.requests[0].body == body


async def test_concurrent_requests_each_get_a_connection(
    serve: ServeFixture, models: ModelFixture
) -> None:
    release = asyncio.Event()

    async def script(exchange: Exchange) -> bool:
        await release.wait()
        await exchange.send(answer(exchange.body))
        return True

    server, url = await serve(script)
    model = models(url)
    pool = pool_of(model)

    async def post(number: int) -> bytes:
        async with model.post("/", b"%d" % number) as upstream:
            return await upstream.read()

    tasks = [asyncio.create_task(post(number)) for number in range(50)]
    await wait_until(lambda: len(server.requests) == 50)
    release.set()
    assert await asyncio.gather(*tasks) == [b"%d" % number for number in range(50)]
    assert server.connections == 50 and pool.idle == 50


async def test_a_chunked_answer_arrives_chunk_by_chunk(
    serve: ServeFixture, models: ModelFixture
) -> None:
    go_on = asyncio.Event()

    async def script(exchange: Exchange) -> bool:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        await exchange.send(head + b"Transfer-Encoding: chunked\r\n\r\n9\r\ndata: 0\n\n\r\n")
        await go_on.wait()
        await exchange.send(b"9\r\ndata: 1\n\n\r\n0\r\n\r\n")
        return True

    server, url = await serve(script)
    model = models(url)
    for _ in range(2):
        go_on.clear()
        async with model.post("/stream", b"{}") as upstream:
            assert upstream.content_type == "text/event-stream"
            assert upstream.content_length is None
            assert await upstream.next_chunk() == b"data: 0\n\n"
            go_on.set()
            assert await upstream.next_chunk() == b"data: 1\n\n"
            assert await upstream.next_chunk() == b""
    assert server.connections == 1


async def test_a_body_that_ends_with_the_connection_is_whole_and_not_reused(
    serve: ServeFixture, models: ModelFixture
) -> None:
    async def script(exchange: Exchange) -> bool:
        await exchange.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it")
        return False

    server, url = await serve(script)
    model = models(url)
    pool = pool_of(model)
    for _ in range(2):
        async with model.post("/", b"{}") as upstream:
            assert upstream.content_length is None
            assert await upstream.read() == b"all of it"
    assert server.connections == 2 and pool.idle == 0


@pytest.mark.parametrize("closing", ["Connection: close", "HTTP/1.0"])
async def test_an_answer_that_closes_the_connection_is_not_reused(
    serve: ServeFixture, models: ModelFixture, closing: str
) -> None:
    async def script(exchange: Exchange) -> bool:
        if closing == "HTTP/1.0":
            await exchange.send(answer(b"ok").replace(b"HTTP/1.1", b"HTTP/1.0"))
        else:
            await exchange.send(answer(b"ok", closing))
        return True  # the server would keep it: the client must not

    server, url = await serve(script)
    model = models(url)
    pool = pool_of(model)
    for _ in range(2):
        async with model.post("/", b"{}") as upstream:
            assert await upstream.read() == b"ok"
    assert server.connections == 2 and pool.opened == 2
    await wait_until(lambda: server.closed_by_peer == 2)


async def test_a_connection_the_server_closed_while_idle_is_not_used(
    serve: ServeFixture, models: ModelFixture
) -> None:
    async def script(exchange: Exchange) -> bool:
        await exchange.send(answer(b"ok"))
        return False  # closes after answering, without saying so

    server, url = await serve(script)
    model = models(url)
    pool = pool_of(model)
    async with model.post("/", b"{}") as upstream:
        assert await upstream.read() == b"ok"
    await wait_until(lambda: pool.take_idle() is None)
    async with model.post("/", b"{}") as upstream:
        assert await upstream.read() == b"ok"
    assert server.connections == 2


async def test_an_informational_answer_is_skipped(
    serve: ServeFixture, models: ModelFixture
) -> None:
    async def script(exchange: Exchange) -> bool:
        await exchange.send(b"HTTP/1.1 100 Continue\r\n\r\n" + answer(b"final", status="201 Made"))
        return True

    _, url = await serve(script)
    async with models(url).post("/", b"{}") as upstream:
        assert upstream.status == 201
        assert await upstream.read() == b"final"


async def test_a_truncated_body_is_an_error(serve: ServeFixture, models: ModelFixture) -> None:
    async def script(exchange: Exchange) -> bool:
        await exchange.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
        return False

    _, url = await serve(script)
    model = models(url)
    pool = pool_of(model)
    async with model.post("/", b"{}") as upstream:
        with pytest.raises(Disconnected):
            await upstream.read()
    assert pool.idle == 0


async def test_a_close_before_any_answer_is_an_error(
    serve: ServeFixture, models: ModelFixture
) -> None:
    async def script(exchange: Exchange) -> bool:
        return False

    _, url = await serve(script)
    model = models(url)
    pool = pool_of(model)
    with pytest.raises(Disconnected):
        async with model.post("/", b"{}"):
            pass
    assert pool.idle == 0


async def test_bytes_that_are_not_http_are_an_error(
    serve: ServeFixture, models: ModelFixture
) -> None:
    async def script(exchange: Exchange) -> bool:
        await exchange.send(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        return True

    server, url = await serve(script)
    with pytest.raises(BadAnswer):
        async with models(url).post("/", b"{}"):
            pass
    await wait_until(lambda: server.closed_by_peer == 1)


async def test_endless_headers_are_an_error(serve: ServeFixture, models: ModelFixture) -> None:
    async def script(exchange: Exchange) -> bool:
        await exchange.send(b"HTTP/1.1 200 OK\r\n")
        with contextlib.suppress(ConnectionError):
            for number in range(100_000):  # 3 MiB of headers, never ending
                await exchange.send(b"X-Header-%06d: %s\r\n" % (number, b"v" * 8))
        return False

    _, url = await serve(script)
    model = models(url)
    pool = pool_of(model)
    with pytest.raises(BadAnswer, match="head is over"):
        async with model.post("/", b"{}"):
            pass
    assert pool.idle == 0


async def test_silence_past_the_read_timeout_is_an_error_but_a_slow_stream_is_not(
    serve: ServeFixture, models: ModelFixture
) -> None:
    async def script(exchange: Exchange) -> bool:
        if exchange.body == b"mute":
            await asyncio.sleep(30)
        await exchange.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        if exchange.body == b"silent":
            await asyncio.sleep(30)
            return False
        for _ in range(10):  # 1 s in all, twice the read timeout; a gap 5 times shorter than it
            await asyncio.sleep(0.1)
            await exchange.send(b"1\r\nx\r\n")
        await exchange.send(b"0\r\n\r\n")
        return True

    _, url = await serve(script)
    model = models(url)
    async with model.post("/", b"slow", read_timeout=0.5) as upstream:
        assert await upstream.read() == b"x" * 10
    async with model.post("/", b"silent", read_timeout=0.3) as upstream:
        with pytest.raises(ReadTimedOut):
            await upstream.read()
    with pytest.raises(ReadTimedOut):  # silence before the headers counts too
        async with model.post("/", b"mute", read_timeout=0.3):
            pass


async def test_a_refused_connection_is_connect_failed(
    models: ModelFixture, refused_port: int
) -> None:
    with pytest.raises(ConnectFailed):
        async with models(f"http://127.0.0.1:{refused_port}").post("/", b"{}"):
            pass


async def test_a_cancelled_request_closes_its_connection(
    serve: ServeFixture, models: ModelFixture
) -> None:
    async def script(exchange: Exchange) -> bool:
        await exchange.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n")
        return True

    server, url = await serve(script)
    model = models(url)
    pool = pool_of(model)

    async def read_forever() -> None:
        async with model.post("/", b"{}") as upstream:
            while await upstream.next_chunk():
                pass

    task = asyncio.create_task(read_forever())
    await wait_until(lambda: len(server.requests) == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until(lambda: server.closed_by_peer == 1)  # the model server sees it at once
    assert pool.idle == 0


async def test_a_slow_reader_pauses_the_model_server(
    serve: ServeFixture, models: ModelFixture
) -> None:
    chunk = b"y" * 65536
    total = 64 * len(chunk)  # 4 MiB

    async def script(exchange: Exchange) -> bool:
        await exchange.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(total // len(chunk)):
            exchange.writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        await exchange.send(b"0\r\n\r\n")
        return True

    server, url = await serve(script)
    model = models(url)
    async with model.post("/", b"{}") as upstream:
        received = len(await upstream.next_chunk())
        # The client stopped reading: the model server's data backs up behind it ...
        await wait_until(lambda: server.writers[0].transport.get_write_buffer_size() > 0)
        # ... and what the client holds stays near the high-water mark, not 4 MiB.
        held = len(await upstream.next_chunk())
        assert held <= HIGH_WATER + 4 * len(chunk)
        received += held
        while data := await upstream.next_chunk():
            received += len(data)
    assert received == total


async def test_a_connection_paused_under_an_unread_answer_reads_the_next_one(
    serve: ServeFixture, models: ModelFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The answer must arrive whole in one read and be over the high-water mark: reading pauses
    # with the answer complete. A few KB sent in one write arrive in one read on loopback
    # (hundreds of KB may not, on a loaded machine), so the mark is lowered for this test.
    monkeypatch.setattr(connection, "HIGH_WATER", 2_000)
    big = b"z" * 3_000

    async def script(exchange: Exchange) -> bool:
        await exchange.send(answer(big if exchange.body == b"big" else b"small"))
        return True

    server, url = await serve(script)
    model = models(url)
    pool = pool_of(model)
    async with model.post("/", b"big") as upstream:
        await wait_until(lambda: upstream.complete)  # arrived, never read
    assert pool.idle == 1
    async with backports.timeout(5), model.post("/", b"next") as upstream:
        assert await upstream.read() == b"small"
    assert server.connections == 1


async def test_idle_connections_are_capped_and_expire(
    serve: ServeFixture, models: ModelFixture
) -> None:
    release = asyncio.Event()

    async def script(exchange: Exchange) -> bool:
        await release.wait()
        await exchange.send(answer(b"ok"))
        return True

    server, url = await serve(script)
    model = models(url, max_idle=2, idle_timeout=1.0)  # outlasts a stall of a loaded machine
    pool = pool_of(model)

    async def post() -> bytes:
        async with model.post("/", b"{}") as upstream:
            return await upstream.read()

    tasks = [asyncio.create_task(post()) for _ in range(3)]
    await wait_until(lambda: len(server.requests) == 3)
    release.set()
    assert await asyncio.gather(*tasks) == [b"ok"] * 3
    assert pool.idle == 2
    await wait_until(lambda: server.closed_by_peer == 1)  # the third was over the cap
    await wait_until(lambda: server.closed_by_peer == 3)  # the other two expired
    assert pool.idle == 0


async def test_a_get_has_no_body_and_a_path_cannot_inject_headers(
    serve: ServeFixture, models: ModelFixture
) -> None:
    async def script(exchange: Exchange) -> bool:
        await exchange.send(answer(b"healthy"))
        return True

    server, url = await serve(script)
    model = models(url)
    pool = pool_of(model)
    async with model.get("/health") as upstream:
        assert (upstream.status, await upstream.read()) == (200, b"healthy")
    head = server.requests[0].head.decode()
    assert head.startswith("GET /health HTTP/1.1\r\n")
    assert "Content-Type" not in head and "Content-Length: 0\r\n" in head
    for path in ("/x\r\nX-Injected: 1", "/a b", "no-slash", "/caf\u00e9"):
        with pytest.raises(ValueError, match="not a request path"):
            async with model.post(path, b"{}"):
                pass
    assert len(server.requests) == 1
    assert pool.idle == 1  # the connection was not taken for the refused paths


# --- bodies in parts (multipart uploads) ------------------------------------------------------
async def test_a_body_in_parts_arrives_whole_under_its_own_content_type(
    serve: ServeFixture, models: ModelFixture
) -> None:
    async def script(exchange: Exchange) -> bool:
        await exchange.send(answer(b"%d" % len(exchange.body)))
        return True

    server, url = await serve(script)
    model = models(url)
    large = bytes(range(256)) * (5 * 1024 * 1024 // 256)  # many slices, past the socket buffer
    parts: list[bytes | bytearray | memoryview] = [
        b"--b\r\n",
        large,
        bytearray(b"\r\n--b--\r\n"),
        memoryview(b"tail"),
    ]
    body = EncodedBody("multipart/form-data; boundary=b", parts)
    async with model.post("/v1/audio/transcriptions", body) as upstream:
        assert await upstream.read() == b"%d" % body.length
    async with model.post("/v1/completions", b"{}") as upstream:
        assert await upstream.read() == b"2"
    first, second = server.requests
    assert first.body == b"".join(bytes(part) for part in parts)
    assert "Content-Type: multipart/form-data; boundary=b\r\n" in first.head.decode()
    assert f"Content-Length: {body.length}\r\n" in first.head.decode()
    assert "Content-Type: application/json\r\n" in second.head.decode()
    assert server.connections == 1  # a body sent whole leaves the connection reusable


async def test_an_answer_before_the_whole_body_stops_the_upload_and_drops_the_connection(
    models: ModelFixture,
) -> None:
    """An engine that refuses an upload from its headers (413) and never reads the rest."""
    connections: list[asyncio.StreamWriter] = []
    dropped = asyncio.Event()
    received = 0

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer(b'{"error": "too large"}', status="413 Payload Too Large"))
        await writer.drain()
        nonlocal received
        try:
            while data := await reader.read(1024 * 1024):
                received += len(data)
        except ConnectionError:
            pass
        dropped.set()  # the client closed the connection

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        model = models(url)
        pool = pool_of(model)
        body = EncodedBody("multipart/form-data; boundary=b", [bytes(64 * 1024 * 1024)])
        async with model.post("/upload", body) as upstream:
            assert upstream.status == 413
            assert await upstream.read() == b'{"error": "too large"}'
        assert pool.idle == 0  # half a request went out: the connection cannot carry another
        await asyncio.wait_for(dropped.wait(), 10)
        assert received < body.length // 2  # the rest of the upload was never sent
    finally:
        for writer in connections:
            writer.close()
        server.close()
