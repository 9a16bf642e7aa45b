from __future__ import annotations

import asyncio
import base64
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any

import aiohttp
import pytest
import uvloop
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from pyworker.config import WorkerConfig
from pyworker.config.environment import Environment
from pyworker.lifecycle.state import IllegalTransition, LifecycleEvent, WorkerState
from pyworker.protocol.auth import reference_message
from pyworker.protocol.messages import PUBKEY_PATH
from pyworker.serving.compose import Worker, compose_worker
from pyworker.serving.server import RUNNER_OPTIONS
from tests.support.model_server import Recorder, create_app
from tests.support.recording_host import Handler, HostFactory, RecordingHost


class KeyPair:
    def __init__(self) -> None:
        self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.pem = self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, url: str) -> str:
        signature = self.private.sign(reference_message(url), padding.PKCS1v15(), hashes.SHA256())
        return base64.b64encode(signature).decode()

    def auth_data(self, url: str = "http://127.0.0.1:1", **fields: Any) -> dict[str, Any]:
        data: dict[str, Any] = {
            "cost": 10,
            "endpoint": "test",
            "reqnum": 1,
            "request_idx": 1,
            "url": url,
            "signature": self.sign(url),
        }
        data.update(fields)
        return data


_KEYPAIR: KeyPair | None = None

LoopFactories = Mapping[str, Callable[[], asyncio.AbstractEventLoop]]
DEFAULT_LOOP: LoopFactories = {"asyncio": asyncio.new_event_loop}
BOTH_LOOPS: LoopFactories = {**DEFAULT_LOOP, "uvloop": uvloop.new_event_loop}
BOTH_LOOP_MODULES = (
    "tests.serving.test_app",
    "tests.upstream.test_pool",
    "tests.upstream.test_framing",
    "tests.lifecycle.test_state",
)
"""The request path runs on uvloop in production: these modules' tests run on both loops."""
MASTER_TOKEN = "operator-token-5f3a"
OPERATOR_HEADERS = {"Authorization": f"Bearer {MASTER_TOKEN}"}


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> LoopFactories:
    module = getattr(item, "module", None)
    if module is not None and module.__name__ in BOTH_LOOP_MODULES:
        return BOTH_LOOPS
    return DEFAULT_LOOP


@pytest.fixture(autouse=True)
def isolated_files(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Benchmark caches and `.has_benchmark` land in a temporary folder, never the repo or home."""
    folder = tmp_path_factory.mktemp("work")
    monkeypatch.setenv("PYWORKER_CACHE_DIR", str(folder / "cache"))
    monkeypatch.chdir(folder)


@pytest.fixture(autouse=True)
def illegal_transitions(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[IllegalTransition]]:
    """No test may make the worker move where its state machine forbids, caught or not."""
    raised: list[IllegalTransition] = []
    original = IllegalTransition.__init__

    def record(error: IllegalTransition, state: WorkerState, event: LifecycleEvent) -> None:
        original(error, state, event)
        raised.append(error)

    monkeypatch.setattr(IllegalTransition, "__init__", record)
    yield raised
    assert not raised, f"illegal worker state transitions: {[str(e) for e in raised]}"


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections for the whole test.

    Bound and never listening, it is held: no other process can start listening on it
    between picking it and using it, as one can on a port picked and then let go.
    """
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port: int = holder.getsockname()[1]
        yield port


@pytest.fixture
def keypair() -> KeyPair:
    global _KEYPAIR
    if _KEYPAIR is None:
        _KEYPAIR = KeyPair()  # 2048-bit generation is slow: one per session is enough
    return _KEYPAIR


class ModelServer:
    def __init__(self, server: TestServer, recorder: Recorder) -> None:
        self.server = server
        self.recorder = recorder

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")


@pytest.fixture
async def model_server() -> AsyncIterator[ModelServer]:
    recorder = Recorder()
    server = TestServer(create_app(recorder), host="127.0.0.1")
    await server.start_server()
    yield ModelServer(server, recorder)
    recorder.release.set()
    await server.close()


@pytest.fixture
async def pubkey_server(keypair: KeyPair) -> AsyncIterator[str]:
    async def pubkey(request: web.Request) -> web.Response:
        return web.Response(body=keypair.pem, content_type="text/plain")

    app = web.Application()
    app.router.add_get(PUBKEY_PATH, pubkey)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("")).rstrip("/")
    await server.close()


class RunningWorker:
    def __init__(self, worker: Worker, server: TestServer, session: aiohttp.ClientSession) -> None:
        self.worker = worker
        self.server = server
        self.session = session

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    def post(self, path: str, body: Any = None, **kwargs: Any) -> Any:
        if isinstance(body, dict | list):
            kwargs["json"] = body
        elif body is not None:
            kwargs["data"] = body
        return self.session.post(self.url + path, **kwargs)


WorkerFactory = Callable[..., Awaitable[RunningWorker]]


@pytest.fixture
async def start_worker(
    model_server: ModelServer, pubkey_server: str
) -> AsyncIterator[WorkerFactory]:
    started: list[tuple[TestServer, aiohttp.ClientSession]] = []

    async def start(
        routes: list[dict[str, Any]] | None = None,
        secured: bool = True,
        wait_ready: bool = True,
        **config: Any,
    ) -> RunningWorker:
        raw: dict[str, Any] = {
            "model_server": {"base_url": model_server.url},
            "routes": routes
            or [
                {"path": "/echo"},
                {"path": "/slow", "workload": "cost"},
                {"path": "/stream"},
                {"path": "/compressed"},
            ],
        }
        raw.update(config)
        raw.setdefault("perf", 1000.0)  # a known perf skips the benchmark unless a test wants it
        environ = {
            "REPORT_ADDR": pubkey_server,
            "UNSECURED": "false" if secured else "true",
            "MASTER_TOKEN": MASTER_TOKEN,
            # The public address KeyPair.auth_data signs by default: signatures bind to it.
            "PUBLIC_IPADDR": "127.0.0.1",
            "VAST_TCP_PORT_3000": "1",
        }
        worker = compose_worker(WorkerConfig.model_validate(raw), Environment.from_env(environ))
        # Tests read the ledger directly; reporting is tested against a recording autoscaler.
        worker.reporter.addresses = ()
        server = TestServer(worker.create_app(), host="127.0.0.1", **RUNNER_OPTIONS)
        await server.start_server()
        connector = aiohttp.TCPConnector(limit=0)
        # The tests read /status and /metrics in full: as the operator, with the token.
        session = aiohttp.ClientSession(connector=connector, headers=OPERATOR_HEADERS)
        started.append((server, session))
        if wait_ready:
            await wait_until(lambda: worker.status.ready)
        return RunningWorker(worker, server, session)

    yield start
    for server, session in started:
        await session.close()
        await server.close()


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll `predicate` until it holds, failing the test at the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.01)


@pytest.fixture
async def hosts() -> AsyncIterator[HostFactory]:
    """Recording hosts started on demand (a fake autoscaler, key server or signer), all
    closed when the test ends."""
    started: list[RecordingHost] = []

    async def start(handler: Handler) -> RecordingHost:
        host = await RecordingHost(handler).start()
        started.append(host)
        return host

    yield start
    for host in started:
        await host.close()
