"""Bounded resources, with a reserve: descriptors, unverified bodies, compressed bodies.

Workers run as real processes (`pyworker run`) in front of the scriptable model server and a
recording autoscaler; each test floods one resource, then checks what the clients, the model
server and the autoscaler saw, that the worker's memory came back, and that it still serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from pyworker.serving.connections import DescriptorBudget
from tests.conftest import KeyPair, ModelServer, WorkerFactory, wait_until
from tests.support.fake_autoscaler import FakeAutoscaler
from tests.support.processes import spawn, stop

REPOSITORY = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024
LOW_LIMIT = 256
RSS_SLACK = 60 * MiB
"""What a burst may leave behind in the worker's resident memory, once it is over."""

LIMITED_START = (
    "import resource, runpy, sys\n"
    "limit = int(sys.argv[1])\n"
    "resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))\n"
    "sys.argv = ['pyworker', 'run', *sys.argv[2:]]\n"
    "runpy.run_module('pyworker', run_name='__main__')\n"
)


class Scene:
    def __init__(self, tmp_path: Path, keypair: KeyPair, model: ModelServer) -> None:
        self.tmp_path = tmp_path
        self.keypair = keypair
        self.model = model
        self.autoscaler = FakeAutoscaler(keypair.pem)
        self.process: asyncio.subprocess.Process | None = None
        self.url = ""
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def start(
        self, descriptors: int | None = None, max_body: int = 32 * MiB, **environ: str
    ) -> None:
        config = self.tmp_path / "worker.toml"
        config.write_text(
            f'name = "resources"\nperf = 100.0\nmax_body_size = {max_body}\n'
            f'[model_server]\nbase_url = "{self.model.url}"\n'
            '[[routes]]\npath = "/echo"\n[[routes]]\npath = "/slow"\n'
        )
        env = dict(os.environ)
        env.update(
            REPORT_ADDR=self.autoscaler.url,
            CONTAINER_ID="12",
            UNSECURED="false",
            WORKER_HOST="127.0.0.1",
            PYTHONPATH=str(REPOSITORY),
            PYWORKER_REPORT_INTERVAL="0.2",
            PYWORKER_CACHE_DIR=str(self.tmp_path / "cache"),
            **environ,
        )
        env.pop("PUBLIC_IPADDR", None)
        arguments = [str(config), "--port", "0"]
        if descriptors is None:
            self.process, self.url = await spawn("-m", "pyworker", "run", *arguments, env=env)
        else:
            self.process, self.url = await spawn(
                "-c", LIMITED_START, str(descriptors), *arguments, env=env
            )
        await self.wait_ready()

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError):
                async with self.session.get(self.url + "/health") as answer:
                    if (await answer.json())["state"] == "ready":
                        return
            await asyncio.sleep(0.05)
        raise AssertionError("the worker never became ready")

    def envelope(self, request_idx: int, payload: Any = None, **auth: Any) -> dict[str, Any]:
        signed = self.keypair.auth_data(self.url, request_idx=request_idx, **auth)
        return {"auth_data": signed, "payload": {"n": request_idx} if payload is None else payload}

    async def serves(self, request_idx: int) -> None:
        """A valid request is answered by the model, and its request_idx reported done."""
        async with self.session.post(self.url + "/echo", json=self.envelope(request_idx)) as r:
            assert r.status == 200, await r.text()
            assert await r.json() == {"received": {"n": request_idx}}
        await wait_until(lambda: request_idx in self.finished_idxs(), 15)

    def finished_idxs(self) -> list[int]:
        return [i["request_idx"] for b in self.autoscaler.delete_requests for i in b["requests"]]

    def rss(self) -> int:
        assert self.process is not None
        return int(psutil.Process(self.process.pid).memory_info().rss)

    def descriptors(self) -> int:
        assert self.process is not None
        return psutil.Process(self.process.pid).num_fds()


@pytest.fixture
async def scene(
    tmp_path: Path, keypair: KeyPair, model_server: ModelServer
) -> AsyncIterator[Scene]:
    scene = Scene(tmp_path, keypair, model_server)
    await scene.autoscaler.start()
    try:
        yield scene
    finally:
        await scene.session.close()
        if scene.process is not None:
            await stop(scene.process)
        await scene.autoscaler.close()


async def settled_rss(scene: Scene, baseline: int, timeout: float = 10.0) -> int:
    """The worker's RSS once it is back within `RSS_SLACK` of `baseline`, or at the deadline."""
    deadline = time.monotonic() + timeout
    while scene.rss() > baseline + RSS_SLACK and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return scene.rss()


# --- descriptors ---------------------------------------------------------------------------------
def test_the_connection_cap_leaves_a_reserve_below_the_descriptor_limit() -> None:
    budget = DescriptorBudget.plan(limit=1024, in_use=40)
    assert budget.backlog == 128
    # Two descriptors a client (its own, one to the model server) and the worker's reserve.
    assert 2 * budget.max_connections + 40 + budget.backlog + 64 <= 1024
    assert DescriptorBudget.plan(1024, 40, configured=10).max_connections == 10
    assert DescriptorBudget.plan(limit=64, in_use=40).max_connections == 16  # a floor


async def test_idle_connections_past_the_cap_make_room_and_the_worker_keeps_working(
    scene: Scene,
) -> None:
    await scene.start(descriptors=LOW_LIMIT)
    await scene.serves(1)
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for _ in range(LOW_LIMIT + 100):  # more than the worker has descriptors for
        idle.append(await asyncio.open_connection("127.0.0.1", int(scene.url.rsplit(":", 1)[1])))
    await wait_until(lambda: scene.descriptors() < LOW_LIMIT - 64)
    reports = len(scene.autoscaler.worker_status)
    await scene.serves(2)  # a new client gets in: the oldest idle connections made room
    async with scene.session.get(scene.url + "/health") as answer:
        assert answer.status == 200
    await wait_until(lambda: len(scene.autoscaler.worker_status) > reports)  # reporter alive
    closed = 0
    for reader, writer in idle:
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            if await asyncio.wait_for(reader.read(1), 0.01) == b"":
                closed += 1
        writer.close()
    assert closed >= 100  # the worker shed them, rather than run out of descriptors
    assert scene.descriptors() < LOW_LIMIT - 64


async def test_past_the_cap_with_every_connection_busy_new_ones_get_503(
    scene: Scene, model_server: ModelServer
) -> None:
    await scene.start(descriptors=LOW_LIMIT, PYWORKER_MAX_CONNECTIONS="20")
    slow = {"wait_release": True}
    held = [
        asyncio.create_task(scene.session.post(scene.url + "/slow", json=scene.envelope(n, slow)))
        for n in range(100, 120)
    ]
    await wait_until(lambda: model_server.recorder.active == 20)
    async with (
        aiohttp.ClientSession() as other,  # a fresh connection: over the cap
        other.post(scene.url + "/echo", json=scene.envelope(7)) as answer,
    ):
        assert answer.status == 503
        assert answer.headers["Retry-After"] == "1"
        assert await answer.json() == {"error": "too many open connections"}
    statuses = scene.autoscaler.worker_status
    await wait_until(lambda: any(r["num_requests_working"] == 20 for r in statuses))
    model_server.recorder.release.set()
    for task in held:
        answer = await task
        assert answer.status == 200
        answer.release()
    assert 7 not in [p.get("n") for p in model_server.recorder.payloads]  # never forwarded
    await scene.serves(8)


# --- bodies that are not verified yet ------------------------------------------------------------
@pytest.mark.parametrize("budget", ["default", "unbounded"])
async def test_many_large_unsigned_bodies_are_bounded_and_their_memory_given_back(
    scene: Scene, model_server: ModelServer, budget: str
) -> None:
    if budget == "default":
        await scene.start()
    else:  # every body is read whole: the memory must still come back after the burst
        await scene.start(PYWORKER_MAX_UNVERIFIED_BYTES=str(1024 * MiB))
    await scene.serves(1)
    baseline = scene.rss()
    forged = scene.envelope(66, {"x": "a" * (30 * MiB)}, signature=KeyPair().sign(scene.url))
    body = json.dumps(forged).encode()

    async def send() -> tuple[int, str | None]:
        async with aiohttp.ClientSession() as client:
            try:
                async with client.post(scene.url + "/echo", data=body) as answer:
                    await answer.read()
                    return answer.status, answer.headers.get("Retry-After")
            except aiohttp.ClientError:
                return 0, None  # refused before the whole body was sent: the worker closed

    answers = await asyncio.gather(*(send() for _ in range(16)))
    statuses = sorted(status for status, _ in answers)
    assert set(statuses) <= {0, 401, 503}, statuses
    assert all(retry == "1" for status, retry in answers if status == 503)
    assert statuses.count(401) >= 1  # within the budget, bodies are read and refused
    if budget == "unbounded":
        assert statuses == [401] * 16
    after = await settled_rss(scene, baseline)
    print(
        f"budget {budget}: RSS before {baseline / MiB:.0f} MiB, after 16 concurrent 30 MB"
        f" unsigned bodies: {after / MiB:.0f} MiB; answers {statuses}"
    )
    assert after - baseline < RSS_SLACK
    assert model_server.recorder.payloads[1:] == []  # only the first valid request got through
    assert 66 not in scene.finished_idxs()
    await scene.serves(2)


async def test_a_streamed_body_past_the_budget_is_503_and_the_budget_comes_back(
    start_worker: WorkerFactory, keypair: KeyPair
) -> None:
    worker = await start_worker()
    budget = worker.worker.unverified
    budget.limit = 200_000
    port = int(worker.url.rsplit(":", 1)[1])
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: w\r\nContent-Length: 150000\r\n\r\n{")
    await writer.drain()
    await wait_until(lambda: budget.held == 150_000)  # a declared length is held up front
    chunked = b"x" * 100_000
    async with worker.session.post(worker.url + "/echo", data=_chunks(chunked)) as answer:
        assert answer.status == 503 and answer.headers["Retry-After"] == "1"
    writer.close()
    await wait_until(lambda: budget.held == 0)
    assert budget.refused == 1
    async with worker.post("/echo", {"auth_data": keypair.auth_data(), "payload": {}}) as answer:
        assert answer.status == 200


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    for index in range(0, len(data), 10_000):
        yield data[index : index + 10_000]


# --- compressed bodies ---------------------------------------------------------------------------
def gzip_bomb(decoded: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = b" " * MiB
    parts = [compressor.compress(b'{"payload": "')]
    parts += [compressor.compress(block) for _ in range(decoded // MiB)]
    parts.append(compressor.compress(b'"}') + compressor.flush())
    return b"".join(parts)


async def test_a_gzip_bomb_is_413_at_its_decoded_limit_without_being_inflated_whole(
    scene: Scene, model_server: ModelServer
) -> None:
    await scene.start(max_body=MiB)
    baseline = scene.rss()
    bomb = gzip_bomb(512 * MiB)
    assert len(bomb) < 1 * MiB
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    started = time.monotonic()
    async with scene.session.post(scene.url + "/echo", data=bomb, headers=headers) as answer:
        assert answer.status == 413
        assert await answer.json() == {"error": f"request body over {MiB} bytes"}
    seconds = time.monotonic() - started
    print(f"gzip bomb of 512 MiB ({len(bomb)} bytes sent): 413 in {seconds:.2f} s")
    assert scene.rss() - baseline < RSS_SLACK
    # A small compressed request is decoded and served as any other.
    small = zlib.compressobj(6, zlib.DEFLATED, 31)
    packed = small.compress(json.dumps(scene.envelope(3)).encode()) + small.flush()
    async with scene.session.post(scene.url + "/echo", data=packed, headers=headers) as answer:
        assert answer.status == 200
        assert await answer.json() == {"received": {"n": 3}}
    assert model_server.recorder.payloads == [{"n": 3}]


def test_the_descriptor_limit_is_raised_to_the_hard_one() -> None:
    script = (
        "import resource\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))\n"
        "from pyworker.serving.connections import raise_descriptor_limit\n"
        "print(raise_descriptor_limit() == min(hard, 1 << 20))\n"
    )
    output = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert output.stdout.strip() == "True"
