"""The worker holds no more connections to llama-server than llama-server has threads.

llama-server serves each connection with an HTTP thread of its own (its slots plus 2 by
default) and holds the thread while the connection is open: a request on a connection past
them waits while the others go on (measured: 12 clients at once on 4 slots, most answered in
0.5 s, some after 20 s). Started as users start it (no `--threads-http`), llama-server
declares its slots at `/props`; the `llama` worker reads them, keeps to one connection more
than the slots (its health checks to the last thread) and queues the rest of a burst itself,
in order. Here a burst of three times the slots goes through the worker while the test counts
the worker's connections to llama-server.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from tests.support.llama import (
    Process,
    find_or_build_binary,
    free_port,
    spawn_worker,
    start_llama_server,
    wait_until_ready,
)
from tests.support.tiny_gguf import ModelShape, write_model

pytestmark = pytest.mark.timeout(900)

SLOTS = 4
BURST = 3 * SLOTS
ROUNDS = 3
STEP_TIMEOUT = 120.0
CAP_LINE = re.compile(r"at most (\d+) connections open to it \((\d+) declared at /props")


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    folder = tmp_path_factory.mktemp("llama")
    model = write_model(folder / "tiny.gguf", ModelShape(n_ctx=512))
    server = start_llama_server(
        find_or_build_binary(),
        model,
        folder / "llama-server.log",
        slots=SLOTS,
        default_threads=True,
    )
    yield server
    server.stop()


def open_connections(worker: psutil.Process, port: int) -> int:
    """The worker's TCP connections to `port` that are open (not closing)."""
    listing = getattr(worker, "net_connections", None) or worker.connections
    return sum(
        1
        for connection in listing(kind="tcp")
        if connection.raddr
        and connection.raddr.port == port
        and connection.status == psutil.CONN_ESTABLISHED
    )


def envelope(payload: dict[str, Any]) -> dict[str, Any]:
    """An UNSECURED worker needs the auth_data fields, not a valid signature."""
    auth = {"cost": 1, "endpoint": "t", "reqnum": 1, "request_idx": 1, "signature": ""}
    return {"auth_data": {**auth, "url": "http://127.0.0.1:1"}, "payload": payload}


@pytest.mark.parametrize(
    "setting",
    ["benchmark.max_seconds=5", "perf=500"],
    ids=["measured", "perf-set-no-benchmark"],
)
async def test_a_burst_past_the_slots_waits_in_the_worker_not_behind_llamas_threads(
    llama: Process, tmp_path: Path, setting: str
) -> None:
    environ = {
        "MODEL_SERVER_URL": llama.url,
        "MODEL_LOG": str(llama.log),
        "UNSECURED": "true",
        "REPORT_ADDR": f"http://127.0.0.1:{free_port()}",  # nobody listens: reports dropped
        "PYWORKER_CACHE_DIR": str(tmp_path / "cache"),
    }
    worker = await asyncio.to_thread(
        spawn_worker,
        tmp_path / "worker.log",
        environ,
        "--set",
        setting,
        worker="llama",
    )
    try:
        await asyncio.to_thread(wait_until_ready, worker.url, worker.process, STEP_TIMEOUT)
        cap = CAP_LINE.search(worker.log_text())
        assert cap is not None, worker.log_text()[-3000:]
        assert (int(cap.group(1)), int(cap.group(2))) == (SLOTS + 1, SLOTS)
        port = int(llama.url.rsplit(":", 1)[1])
        watched = psutil.Process(worker.process.pid)
        most = 0
        timeout = aiohttp.ClientTimeout(total=STEP_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as session:

            async def complete(index: int) -> int:
                payload = {"prompt": f"burst {index}", "max_tokens": 48, "ignore_eos": True}
                async with session.post(
                    worker.url + "/v1/completions", json=envelope(payload)
                ) as answer:
                    document = await answer.json()
                assert answer.status == 200, document
                return int(document["usage"]["completion_tokens"])

            for _ in range(ROUNDS):
                burst = asyncio.gather(*(complete(index) for index in range(BURST)))
                while not burst.done():
                    most = max(most, open_connections(watched, port))
                    await asyncio.wait({burst}, timeout=0.01)
                assert await burst == [48] * BURST
    finally:
        assert await asyncio.to_thread(worker.stop) == 0, worker.log_text()[-3000:]
    # The slots plus one for requests; a health check may open one more for its moment.
    assert SLOTS <= most <= SLOTS + 2, most
