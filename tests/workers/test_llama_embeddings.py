"""`pyworker run openai` benchmarking and serving embeddings before a real llama-server.

llama-server runs the tiny random-weight model with `--embeddings --pooling mean`; the worker
runs with `BENCHMARK_ROUTE=/v1/embeddings`, so its tokens/s comes from the `usage` of real
embedding answers. Without `--embeddings` llama-server answers 501, and the worker must say
which route failed and which variable to change. Like tests/workers/test_llama_integration.py, these
skip locally until scripts/build-llama-server has run, and fail in CI without the binary.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pyworker.workers.openai.routes import EMBEDDINGS
from tests.conftest import MASTER_TOKEN, OPERATOR_HEADERS, KeyPair
from tests.support.fake_autoscaler import FakeAutoscaler
from tests.support.llama import (
    Process,
    find_or_build_binary,
    spawn_worker,
    start_llama_server,
)
from tests.support.tiny_gguf import ModelShape, write_model

pytestmark = pytest.mark.timeout(1800)

STEP_TIMEOUT = 60.0
EMBEDDING_FLAGS = ("--embeddings", "--pooling", "mean")


@pytest.fixture(scope="module")
def llama_binary() -> Path:
    return find_or_build_binary()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("models") / "tiny.gguf", ModelShape(n_ctx=512))


async def wait_report(
    autoscaler: FakeAutoscaler, predicate: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    return await autoscaler.wait_report(predicate, timeout=STEP_TIMEOUT)


def worker_environ(server: Process, autoscaler: FakeAutoscaler, folder: Path) -> dict[str, str]:
    return {
        "OPENAI_SERVER": "llamacpp",
        "MODEL_SERVER_URL": server.url,
        "MODEL_LOG": str(server.log),
        "BENCHMARK_ROUTE": EMBEDDINGS,
        "REPORT_ADDR": autoscaler.url,
        "CONTAINER_ID": "5",
        "MASTER_TOKEN": MASTER_TOKEN,
        "UNSECURED": "false",
        "PYWORKER_CACHE_DIR": str(folder / "cache"),
    }


RAMP_FLAGS = ("--set", "benchmark.max_seconds=20")


async def test_the_embeddings_benchmark_counts_tokens_from_usage_and_requests_pass_through(
    llama_binary: Path, tiny_model: Path, tmp_path: Path, keypair: KeyPair
) -> None:
    server = await asyncio.to_thread(
        start_llama_server, llama_binary, tiny_model, tmp_path / "llama.log", extra=EMBEDDING_FLAGS
    )
    async with (
        FakeAutoscaler(keypair.pem) as autoscaler,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=STEP_TIMEOUT)) as session,
    ):
        environ = worker_environ(server, autoscaler, tmp_path)
        worker = await asyncio.to_thread(
            spawn_worker, tmp_path / "worker.log", environ, *RAMP_FLAGS
        )
        try:
            ready = await wait_report(autoscaler, lambda r: r["max_perf"] > 0)
            assert ready["error_msg"] == ""
            async with session.get(worker.url + "/status", headers=OPERATOR_HEADERS) as response:
                status = await response.json()
            assert ready["max_perf"] == pytest.approx(status["benchmark"]["perf"])

            # The work counted is the prompt tokens llama-server's own `usage` reports.
            benchmark = status["benchmark"]
            assert benchmark["counted"] == "produced work (from every answer)"
            assert benchmark["ceiling"] == "8 (twice the 4 declared by the engine at /props)"

            # A client's request: the same answer as llama-server's own.
            payload = {"input": ["the worker relays", "embeddings"], "model": "tiny"}
            async with session.post(server.url + EMBEDDINGS, json=payload) as response:
                direct = await response.json()
            auth = keypair.auth_data(worker.url)
            body = {"auth_data": auth, "payload": payload}
            async with session.post(worker.url + EMBEDDINGS, json=body) as response:
                assert response.status == 200
                relayed = await response.json()
            assert relayed == direct and len(relayed["data"]) == 2
        finally:
            assert await asyncio.to_thread(worker.stop) == 0
            assert await asyncio.to_thread(server.stop) == 0


async def test_a_server_without_embeddings_leaves_the_worker_errored_naming_the_route(
    llama_binary: Path, tiny_model: Path, tmp_path: Path, keypair: KeyPair
) -> None:
    server = await asyncio.to_thread(
        start_llama_server, llama_binary, tiny_model, tmp_path / "llama.log"
    )
    async with FakeAutoscaler(keypair.pem) as autoscaler:
        environ = worker_environ(server, autoscaler, tmp_path)
        worker = await asyncio.to_thread(
            spawn_worker, tmp_path / "worker.log", environ, *RAMP_FLAGS
        )
        try:
            errored = await wait_report(autoscaler, lambda r: r["error_msg"] != "")
            message = errored["error_msg"]
            assert EMBEDDINGS in message and "BENCHMARK_ROUTE" in message
            assert "HTTP 501" in message and "--embeddings" in message  # llama-server's words
            assert errored["max_perf"] == 0
        finally:
            assert await asyncio.to_thread(worker.stop) == 0
            assert await asyncio.to_thread(server.stop) == 0
    assert EMBEDDINGS in worker.log_text() and "BENCHMARK_ROUTE" in worker.log_text()
