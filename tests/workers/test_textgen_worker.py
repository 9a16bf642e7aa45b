"""The textgen worker, run as Vast runs it (`python -m workers.textgen.worker`): it loads its
model in its own process, benchmarks its function, serves signed requests and streams."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pyworker.workers.textgen.model import CharModel
from tests.conftest import KeyPair
from tests.support.fake_autoscaler import FakeAutoscaler
from tests.support.processes import spawn, stop

REPOSITORY = Path(__file__).resolve().parents[2]


def test_the_model_continues_text_it_was_trained_on_and_a_seed_repeats_it() -> None:
    model = CharModel.train("the cat sat on the mat. the cat sat on the hat.", order=4)
    assert "".join(model.generate("the c", 6, temperature=0)) == "at sat"
    first = "".join(model.generate("the", 40, temperature=1.0, seed=7))
    assert first == "".join(model.generate("the", 40, temperature=1.0, seed=7))
    assert len(first) == 40 and set(first) <= set("the cat sat on mat.h")


@pytest.fixture
async def autoscaler(keypair: KeyPair) -> AsyncIterator[FakeAutoscaler]:
    async with FakeAutoscaler(keypair.pem) as recording:
        yield recording


async def test_textgen_loads_in_process_benchmarks_serves_and_streams(
    autoscaler: FakeAutoscaler, keypair: KeyPair
) -> None:
    env = dict(os.environ)
    env.update(
        REPORT_ADDR=autoscaler.url,
        CONTAINER_ID="12",
        MASTER_TOKEN="token",
        PYWORKER_CACHE_DIR=str(Path.cwd() / "cache"),
        PYTHONPATH=str(REPOSITORY),
        WORKER_PORT="0",
        WORKER_HTTP_PORT="0",
        WORKER_HOST="127.0.0.1",
    )
    process, url = await spawn("-m", "workers.textgen.worker", env=env)
    try:
        ready = await autoscaler.wait_report(lambda report: report["max_perf"] > 0, timeout=60)
        assert ready["error_msg"] == ""

        def body(payload: dict[str, Any], index: int) -> dict[str, Any]:
            return {"auth_data": keypair.auth_data(url, request_idx=index), "payload": payload}

        asked = {"prompt": "The sea", "max_tokens": 50, "seed": 3}
        async with aiohttp.ClientSession() as session:
            async with session.post(url + "/generate", json=body(asked, 1)) as answer:
                assert answer.status == 200
                whole = await answer.json()
            assert len(whole["text"]) == 50 and whole["usage"]["completion_tokens"] == 50
            async with session.post(url + "/generate_stream", json=body(asked, 2)) as answer:
                assert (answer.status, answer.content_type) == (200, "application/x-ndjson")
                lines = [json.loads(line) for line in (await answer.read()).splitlines()]
            assert len(lines) > 2  # streamed a word at a time
            assert "".join(line.get("text", "") for line in lines) == whole["text"]
            assert lines[-1]["usage"] == whole["usage"]
            refused = {"prompt": "x", "max_tokens": 0}
            async with session.post(url + "/generate", json=body(refused, 3)) as answer:
                assert answer.status == 422 and "max_tokens" in (await answer.json())["error"]

        def reported_load() -> float:
            return float(sum(report["new_load"] for report in autoscaler.worker_status))

        await autoscaler.wait_report(lambda report: reported_load() >= 100)
        assert reported_load() == 100  # the max_tokens of the two served requests
    finally:
        assert await stop(process) == 0
