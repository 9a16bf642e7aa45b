"""The model server's framing, enforced: what one answer's bytes say never becomes another's.

A raw TCP model server on loopback writes exact bytes; a real worker (production runner, real
sockets, signed requests, a recording autoscaler) relays them. Each test checks what the client
receives (status, headers and body exactly, and nothing after), whether the model server's
connection was kept, that the next request is served on a fresh connection, and what the
autoscaler is told about the request.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httptools
import pytest
from aiohttp import web

from pyworker.config import WorkerConfig
from pyworker.config.environment import Environment
from pyworker.serving.compose import Worker, compose_worker
from pyworker.serving.http_errors import JsonErrorRunner
from pyworker.serving.server import RUNNER_OPTIONS
from pyworker.upstream.model import ModelClient
from tests.conftest import KeyPair, wait_until
from tests.support.fake_autoscaler import FakeAutoscaler

TOKEN = "framing-master-token"
GOOD = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'
SMUGGLED = (
    b"HTTP/1.1 200 OK\r\nX-Smuggled: 1\r\nContent-Type: application/json\r\n"
    b'Content-Length: 13\r\n\r\n{"evil":true}'
)


@dataclass
class Received:
    """One request the model server read: on which of its connections, and where to."""

    connection: int
    method: str
    path: str


@dataclass
class RawModelServer:
    """Answers each POST with the next scripted bytes, exactly; a GET with a small 200.

    A script entry is (bytes, then close the connection?). With no entry left it answers
    `GOOD` and keeps the connection."""

    script: list[tuple[bytes, bool]] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    connections: int = 0
    server: asyncio.Server | None = None
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()

    def posts(self) -> list[Received]:
        return [seen for seen in self.received if seen.method == "POST"]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, path, _ = head.split(b" ", 2)
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                self.received.append(Received(number, method.decode(), path.decode()))
                if method != b"POST":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    continue
                answer, close = self.script.pop(0) if self.script else (GOOD, False)
                writer.write(answer)
                await writer.drain()
                if close:
                    writer.close()
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return


@dataclass
class ClientAnswer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    messages: int
    """HTTP messages in all the bytes the client received before the worker closed."""

    def header(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]


class _Collector:
    def __init__(self) -> None:
        self.headers: list[tuple[str, str]] = []
        self.body = b""
        self.messages = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.messages += 1


class Framing:
    """A worker in front of a `RawModelServer`, reporting to a recording autoscaler."""

    def __init__(self, keypair: KeyPair) -> None:
        self.keypair = keypair
        self.model = RawModelServer()
        self.autoscaler = FakeAutoscaler(keypair.pem)
        self.runner: web.AppRunner | None = None
        self.worker: Worker | None = None
        self.port = 0
        self.next_idx = 100

    async def start(self) -> None:
        await self.autoscaler.start()
        config = WorkerConfig.model_validate(
            {
                "model_server": {"base_url": await self.model.start()},
                "routes": [{"path": "/answer"}],
                "perf": 100.0,
            }
        )
        environment = Environment.from_env(
            {
                "REPORT_ADDR": self.autoscaler.url,
                "CONTAINER_ID": "7",
                "UNSECURED": "false",
                "MASTER_TOKEN": TOKEN,
                "PYWORKER_REPORT_INTERVAL": "0.05",
            }
        )
        self.worker = compose_worker(config, environment)
        self.runner = JsonErrorRunner(self.worker.create_app(), **RUNNER_OPTIONS)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]
        self.worker.public_url.value = environment.public_url(self.port)
        worker = self.worker
        await wait_until(lambda: worker.status.ready and worker.verifier.has_key)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        await self.model.stop()
        await self.autoscaler.close()

    async def call(self) -> tuple[int, ClientAnswer]:
        """A signed request on a fresh client connection: its request_idx, and every byte the
        client received until the worker closed the connection, parsed."""
        assert self.worker is not None
        self.next_idx += 1
        url = self.worker.url
        auth = {
            "cost": 10,
            "endpoint": "framing",
            "reqnum": self.next_idx,
            "request_idx": self.next_idx,
            "url": url,
            "signature": self.keypair.sign(url),
        }
        body = json.dumps({"auth_data": auth, "payload": {"prompt": "hi"}}).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(
                b"POST /answer HTTP/1.1\r\nHost: worker\r\nConnection: close\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
            )
            raw = await asyncio.wait_for(reader.read(-1), 10)
        finally:
            writer.close()
        collector = _Collector()
        parser = httptools.HttpResponseParser(collector)
        parser.feed_data(raw)
        answer = ClientAnswer(
            parser.get_status_code(), collector.headers, collector.body, collector.messages
        )
        return self.next_idx, answer

    async def reported(self, request_idx: int) -> dict[str, Any]:
        """The `/delete_requests/` item the autoscaler received for `request_idx`."""

        def item() -> dict[str, Any] | None:
            for body in self.autoscaler.delete_requests:
                for entry in body["requests"]:
                    if entry["request_idx"] == request_idx:
                        return dict(entry)
            return None

        await wait_until(lambda: item() is not None)
        found = item()
        assert found is not None
        return found

    async def serves_the_next_request_on_a_new_connection(self) -> None:
        connections = self.model.connections
        posts = len(self.model.posts())
        request_idx, answer = await self.call()
        assert (answer.status, answer.body, answer.messages) == (200, b'{"ok":true}', 1)
        assert [seen.connection for seen in self.model.posts()[posts:]] == [connections + 1]
        assert (await self.reported(request_idx))["success"] is True


@pytest.fixture
async def framing(keypair: KeyPair) -> AsyncIterator[Framing]:
    target = Framing(keypair)
    await target.start()
    try:
        yield target
    finally:
        await target.stop()


async def test_a_second_answer_after_the_first_never_reaches_a_client(framing: Framing) -> None:
    framing.model.script.append((GOOD + SMUGGLED, False))
    request_idx, answer = await framing.call()
    assert (answer.status, answer.body, answer.messages) == (200, b'{"ok":true}', 1)
    assert answer.header("X-Smuggled") == [] and answer.header("Content-Length") == ["11"]
    assert (await framing.reported(request_idx))["success"] is True
    await framing.serves_the_next_request_on_a_new_connection()
    assert framing.worker is not None and framing.worker.ledger.in_progress == 0


async def test_a_second_answer_written_apart_never_reaches_a_client(framing: Framing) -> None:
    async def late_bytes() -> None:
        await wait_until(lambda: len(framing.model.posts()) == 1)
        connection = framing.model.posts()[0].connection
        framing.model.writers[connection - 1].write(SMUGGLED)  # after `GOOD`, apart

    sender = asyncio.ensure_future(late_bytes())
    request_idx, answer = await framing.call()
    await sender
    assert (answer.status, answer.body, answer.messages) == (200, b'{"ok":true}', 1)
    assert (await framing.reported(request_idx))["success"] is True
    await framing.serves_the_next_request_on_a_new_connection()


async def test_bytes_after_the_last_chunk_never_reach_a_client(framing: Framing) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"6\r\ndata:1\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    framing.model.script.append((chunked + SMUGGLED, False))
    request_idx, answer = await framing.call()
    assert (answer.status, answer.body, answer.messages) == (200, b"data:1", 1)
    assert answer.header("X-Smuggled") == answer.header("X-Trailer") == []
    assert (await framing.reported(request_idx))["success"] is True
    await framing.serves_the_next_request_on_a_new_connection()


async def test_an_answer_without_length_or_chunks_ends_with_the_connection(
    framing: Framing,
) -> None:
    framing.model.script.append(
        (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nread until the close", True)
    )
    request_idx, answer = await framing.call()
    assert (answer.status, answer.body, answer.messages) == (200, b"read until the close", 1)
    assert (await framing.reported(request_idx))["success"] is True
    await framing.serves_the_next_request_on_a_new_connection()


@pytest.mark.parametrize(
    "head",
    [
        b"Content-Length: 5\r\nTransfer-Encoding: chunked",
        b"Transfer-Encoding: chunked\r\nContent-Length: 5",
        b"Transfer-Encoding: gzip, chunked",
        b"Transfer-Encoding: chunked, identity",
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
    ],
)
async def test_a_length_beside_chunking_or_another_coding_is_502(
    framing: Framing, head: bytes
) -> None:
    answer_bytes = b"HTTP/1.1 200 OK\r\n" + head + b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n" + SMUGGLED
    framing.model.script.append((answer_bytes, False))
    request_idx, answer = await framing.call()
    assert answer.status == 502 and answer.messages == 1
    assert b"hello" not in answer.body and b"evil" not in answer.body
    assert json.loads(answer.body)["error"].startswith("model server failed")
    assert answer.header("X-Smuggled") == []
    assert (await framing.reported(request_idx))["success"] is False
    await framing.serves_the_next_request_on_a_new_connection()


@pytest.mark.parametrize(
    "interim",
    [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>\r\n\r\n"],
)
async def test_an_informational_answer_is_skipped_and_the_connection_kept(
    framing: Framing, interim: bytes
) -> None:
    framing.model.script.append((interim + GOOD, False))
    request_idx, answer = await framing.call()
    assert (answer.status, answer.body, answer.messages) == (200, b'{"ok":true}', 1)
    assert answer.header("Link") == []
    assert (await framing.reported(request_idx))["success"] is True
    _, again = await framing.call()
    assert again.status == 200
    assert [seen.connection for seen in framing.model.posts()] == [1, 1]  # kept: well framed


async def test_bytes_after_an_informational_answer_that_are_not_http_are_502(
    framing: Framing,
) -> None:
    framing.model.script.append((b"HTTP/1.1 100 Continue\r\n\r\nnot an answer\r\n\r\n", False))
    request_idx, answer = await framing.call()
    assert answer.status == 502 and b"not an answer" not in answer.body
    assert (await framing.reported(request_idx))["success"] is False
    await framing.serves_the_next_request_on_a_new_connection()


@pytest.mark.parametrize("status", [b"204 No Content", b"304 Not Modified"])
async def test_a_body_after_an_answer_that_has_none_never_reaches_a_client(
    framing: Framing, status: bytes
) -> None:
    head = (
        b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n"
    )
    framing.model.script.append((head + b'{"evil":true}', False))
    request_idx, answer = await framing.call()
    assert (answer.status, answer.body, answer.messages) == (int(status[:3]), b"", 1)
    assert (await framing.reported(request_idx))["success"] is True
    await framing.serves_the_next_request_on_a_new_connection()


async def test_an_endless_answer_to_a_close_route_or_health_check_is_cut_short() -> None:
    """`notify` and `probe` want only the status: an answer that never ends is read up to a
    bound, then its connection is dropped, within the call's timeout."""
    sent: list[int] = []
    ended = asyncio.Event()

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        total = 0
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")  # the GET, or the POST's head ...
                if not sent:
                    await reader.readexactly(2)  # ... and its body, b"{}"
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                while True:
                    writer.write(b"10000\r\n" + b"x" * 0x10000 + b"\r\n")
                    await writer.drain()
                    total += 0x10000
        except (ConnectionError, asyncio.IncompleteReadError):
            sent.append(total)
            ended.set()
        finally:
            writer.close()

    server = await asyncio.start_server(endless, "127.0.0.1", 0)
    client = ModelClient(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", 2.0)
    try:
        assert await client.notify("/close", b"{}", timeout=20.0) == 200
        await asyncio.wait_for(ended.wait(), 20.0)
        ended.clear()
        assert await client.probe("/health", timeout=20.0) == 200
        await asyncio.wait_for(ended.wait(), 20.0)
    finally:
        await client.close()
        server.close()
    assert len(sent) == 2 and all(total < 16 * 1024 * 1024 for total in sent), sent
