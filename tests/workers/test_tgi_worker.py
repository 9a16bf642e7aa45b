"""The `tgi` worker: its rules on real-shaped TGI payloads and answers, its log patterns on real
TGI lines, and end to end: a fake TGI process replaying TGI's log, `pyworker run tgi`, and a
recording autoscaler.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pyworker.config import WorkerConfig
from pyworker.config.loader import load_config
from pyworker.lifecycle.benchmark import produced_documents
from pyworker.lifecycle.logfollow import LineKind, LogFollower, LogPattern
from pyworker.lifecycle.readiness import log_patterns
from pyworker.workers.tgi.worker import (
    DEFAULT_MAX_NEW_TOKENS,
    check_payload,
    produced_work,
    workload,
)
from tests.conftest import KeyPair
from tests.support import fake_tgi
from tests.support.fake_autoscaler import FakeAutoscaler
from tests.support.processes import spawn, stop

REPOSITORY = Path(__file__).resolve().parents[2]

# The answer TGI's API documentation shows for `/generate` with `details: true`.
GENERATE_ANSWER: dict[str, Any] = {
    "generated_text": " learning is a subset of machine learning",
    "details": {
        "finish_reason": "length",
        "generated_tokens": 8,
        "seed": None,
        "prefill": [],
        "tokens": [{"id": 4731, "text": " learning", "logprob": -0.35, "special": False}],
        "top_tokens": [],
    },
}
STREAM = (
    'data:{"index":1,"token":{"id":4731,"text":" learning","logprob":-0.35,"special":false},'
    '"generated_text":null,"details":null}\n\n'
    'data:{"index":2,"token":{"id":318,"text":" is","logprob":-0.2,"special":false},'
    '"generated_text":" learning is","details":{"finish_reason":"length",'
    '"generated_tokens":2,"seed":null}}\n\n'
)


# --- config, workload, produced work ------------------------------------------------------
def test_the_config_loads_from_workers_tgi_with_env_overrides() -> None:
    environ = {"MODEL_SERVER_URL": "http://127.0.0.1:9999", "MODEL_LOG": "/var/log/tgi.log"}
    config = load_config("tgi", environ=environ)
    assert config.name == "tgi"
    assert [route.path for route in config.routes] == ["/generate", "/generate_stream"]
    assert not any(route.fifo for route in config.routes)  # TGI batches
    assert config.model_server.base_url == "http://127.0.0.1:9999"
    assert config.model_server.log_file == "/var/log/tgi.log"
    assert config.model_server.readiness_source == "log"
    assert config.model_server.health_path == "/health"
    assert config.benchmark.route == "/generate"


def test_workload_is_max_new_tokens_plus_the_prompt_estimate() -> None:
    payload = {"inputs": "What is Deep Learning?", "parameters": {"max_new_tokens": 20}}
    assert workload(payload) == 20 + 6  # 22 characters, 4 a token
    assert load_config("tgi", environ={}).routes[1].compute_workload(payload, cost=0) == 26


@pytest.mark.parametrize(
    "parameters",
    [
        None,
        {},
        {"max_new_tokens": None},
        {"max_new_tokens": "20"},
        {"max_new_tokens": True},
        {"max_new_tokens": -1},
        "x",
    ],
)
def test_without_a_usable_max_new_tokens_the_workload_uses_tgis_default(parameters: object) -> None:
    assert workload({"inputs": "abcd", "parameters": parameters}) == DEFAULT_MAX_NEW_TOKENS + 1


def test_produced_work_is_generated_plus_reported_prompt_tokens() -> None:
    assert produced_work(GENERATE_ANSWER) == 8
    prefill = [{"id": 1, "text": "What", "logprob": None}, {"id": 2, "text": " is", "logprob": -1}]
    with_prefill = GENERATE_ANSWER | {"details": GENERATE_ANSWER["details"] | {"prefill": prefill}}
    assert produced_work(with_prefill) == 10
    assert produced_work({"generated_text": "x"}) is None  # details: false
    assert produced_work({"details": {"generated_tokens": "8"}}) is None


def test_produced_work_of_a_stream_is_in_its_last_event() -> None:
    documents = list(produced_documents(STREAM.encode(), "text/event-stream"))
    assert [produced_work(document) for document in documents] == [None, 2]


def test_a_payload_tgi_would_refuse_is_refused_before_the_queue() -> None:
    assert check_payload({"inputs": "hi"}) == {"inputs": "hi"}
    for payload in ({}, {"inputs": ""}, {"inputs": ["a"]}, {"inputs": "a", "parameters": 3}):
        with pytest.raises(ValueError):
            check_payload(payload)


def test_the_shipped_dataset_asks_for_the_details_the_benchmark_counts() -> None:
    config = load_config("tgi", environ={})
    assert config.benchmark.dataset_file is not None
    lines = Path(config.benchmark.dataset_file).read_text().splitlines()
    payloads = [json.loads(line) for line in lines]
    assert len(payloads) >= 4
    for payload in payloads:
        check_payload(payload)
        assert payload["parameters"]["details"] and payload["parameters"]["decoder_input_details"]


# --- log patterns on real TGI lines -------------------------------------------------------
def _classifier(config: WorkerConfig) -> Callable[[str], LogPattern | None]:
    return LogFollower("unused.log", log_patterns(config)).classify


def kind_of(line: str) -> LineKind | None:
    pattern = _classifier(load_config("tgi", environ={}))(
        line.replace("{ts}", "2024-01-01T00:00:00.000000Z")
    )
    return None if pattern is None else pattern.kind


CONNECTED_LINES = [
    "2023-10-16T07:30:41.490000Z  INFO text_generation_router: router/src/main.rs:247: Connected",
    "2024-10-16T10:49:57.123456Z  INFO text_generation_router::server: "
    "router/src/server.rs:2389: Connected",
    '{"timestamp":"2023-10-16T06:44:40.1Z","level":"INFO","message":"Connected",'
    '"target":"text_generation_router","filename":"router/src/main.rs","line_number":247}',
    "\x1b[2m2024-04-18T22:45:01.1Z\x1b[0m \x1b[32m INFO\x1b[0m \x1b[2mtext_generation_router"
    "\x1b[0m\x1b[2m:\x1b[0m \x1b[2mrouter/src/main.rs\x1b[0m\x1b[2m:\x1b[0m\x1b[2m247:\x1b[0m "
    "Connected",
]


@pytest.mark.parametrize("line", CONNECTED_LINES)
def test_the_routers_connected_line_means_loaded(line: str) -> None:
    assert kind_of(line) is LineKind.LOADED


def test_the_replayed_start_up_is_loaded_only_at_connected() -> None:
    kinds = [kind_of(line) for line in (*fake_tgi.STARTUP, *fake_tgi.LOADED)]
    assert kinds.count(LineKind.LOADED) == 1
    assert kinds[len(fake_tgi.STARTUP) + 4] is LineKind.LOADED  # "... main.rs:247: Connected"
    assert LineKind.ERROR not in kinds
    assert kinds.count(LineKind.INFO) >= 4  # download, waiting, shard ready, warming up


@pytest.mark.parametrize(
    "line",
    [
        fake_tgi.OOM,
        "Error: ShardCannotStart",
        "Error: ShardFailed",
        "Error: WebserverFailed",
        "Error: DownloadError",
        "2023-08-17T10:23:27.032737Z ERROR text_generation_launcher: Shard 0 failed to start",
        "2024-01-01T00:00:00.000000Z ERROR text_generation_launcher: Shard 1 crashed",
        "2024-03-31T18:31:04.932785Z ERROR text_generation_launcher: Error when initializing model",
        "2024-04-18T22:45:07.1Z ERROR text_generation_launcher: Webserver Crashed",
    ],
)
def test_tgi_failure_lines_are_fatal_errors(line: str) -> None:
    pattern = _classifier(load_config("tgi", environ={}))(line)
    assert pattern is not None and pattern.kind is LineKind.ERROR and pattern.fatal


def test_a_failed_request_is_counted_but_not_fatal() -> None:
    line = (
        '{"timestamp":"2025-08-29T14:40:17.288163Z","level":"ERROR","message":"Request failed '
        "during generation: Server error: error trying to connect: No such file or directory "
        '(os error 2)","target":"text_generation_router_v3::backend"}'
    )
    pattern = _classifier(load_config("tgi", environ={}))(line)
    assert pattern is not None and pattern.kind is LineKind.ERROR and not pattern.fatal


def test_lines_that_only_look_alike_match_nothing_fatal() -> None:
    for line in (
        "2024-01-01T00:00:00Z  INFO text_generation_launcher: Starting Webserver",
        "2024-01-01T00:00:00Z  INFO text_generation_router: main.rs:1: Not Connected yet",
        "2024-01-01T00:00:00Z  WARN text_generation_router: Unable to connect to the shards",
    ):
        assert kind_of(line) in (None, LineKind.INFO), line


# --- end to end -----------------------------------------------------------------------------
class Scene:
    """A fake TGI, a recording autoscaler and, once started, `pyworker run tgi`."""

    def __init__(self, tmp_path: Path, autoscaler: FakeAutoscaler, keypair: KeyPair) -> None:
        self.tmp_path = tmp_path
        self.autoscaler = autoscaler
        self.keypair = keypair
        self.log = tmp_path / "tgi.log"
        self.model_url = ""
        self.worker_url = ""
        self.session = aiohttp.ClientSession(headers={"Authorization": "Bearer token"})

    def env(self, **extra: str) -> dict[str, str]:
        return os.environ | {
            "REPORT_ADDR": self.autoscaler.url,
            "CONTAINER_ID": "7",
            "MASTER_TOKEN": "token",
            "UNSECURED": "false",
            "PYWORKER_CACHE_DIR": str(self.tmp_path / "cache"),
            "PYTHONPATH": str(REPOSITORY),
            "WORKER_HOST": "127.0.0.1",
            **extra,
        }

    async def start_model(self, *flags: str) -> asyncio.subprocess.Process:
        process, self.model_url = await spawn(
            "-m", "tests.support.fake_tgi", "--log", str(self.log), "--load-after", "0.5",
            "--tokens-per-second", "1000", *flags, env=self.env(),
        )  # fmt: skip
        return process

    async def start_worker(self) -> asyncio.subprocess.Process:
        process, self.worker_url = await spawn(
            "-m", "pyworker", "run", "tgi", "--port", "0",
            "--set", "benchmark.rounds=1", "--set", "benchmark.concurrency=4",
            "--set", "benchmark.max_seconds=1",  # a short ramp: this test is about streams
            env=self.env(MODEL_SERVER_URL=self.model_url, MODEL_LOG=str(self.log)),
        )  # fmt: skip
        return process

    async def wait_report(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 20.0
    ) -> dict[str, Any]:
        return await self.autoscaler.wait_report(predicate, timeout=timeout)

    async def finished(self, request_idx: int, timeout: float = 10.0) -> str:
        """The status the worker reported in /delete_requests/ for `request_idx`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for body in self.autoscaler.delete_requests:
                for item in body.get("requests") or []:
                    if item["request_idx"] == request_idx:
                        return str(item["status"])
            await asyncio.sleep(0.02)
        raise AssertionError(f"request {request_idx} never reported finished")

    def envelope(self, payload: dict[str, Any], request_idx: int) -> dict[str, Any]:
        auth = self.keypair.auth_data(self.worker_url, request_idx=request_idx)
        return {"auth_data": auth, "payload": payload}


@pytest.fixture
async def scene(tmp_path: Path, keypair: KeyPair) -> AsyncIterator[Scene]:
    async with FakeAutoscaler(keypair.pem) as autoscaler:
        scene = Scene(tmp_path, autoscaler, keypair)
        try:
            yield scene
        finally:
            await scene.session.close()


async def test_ready_after_connected_then_streams_token_by_token_then_errors(scene: Scene) -> None:
    model = await scene.start_model()
    worker = await scene.start_worker()
    try:
        ready = await scene.wait_report(lambda r: r["max_perf"] > 0)
        assert scene.autoscaler.worker_status[0]["max_perf"] == 0  # loading was reported first
        assert ready["error_msg"] == "" and ready["loadtime"] > 0 and ready["id"] == 7
        assert scene.log.read_text().count("Connected") == 1

        # The stream is relayed event by event as TGI writes them (one a millisecond).
        payload = {
            "inputs": "What is Deep Learning?",
            "parameters": {"max_new_tokens": 200, "details": True},
        }
        events: list[tuple[float, dict[str, Any]]] = []
        async with scene.session.post(
            scene.worker_url + "/generate_stream", json=scene.envelope(payload, 101)
        ) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "text/event-stream"
            while not response.content.at_eof():
                chunk = await response.content.readuntil(b"\n\n")
                if chunk.strip():
                    events.append((time.monotonic(), json.loads(chunk.strip()[5:])))
        assert len(events) == 200
        assert events[0][1]["generated_text"] is None and events[0][1]["index"] == 1
        assert events[-1][1]["details"]["generated_tokens"] == 200
        assert events[-1][0] - events[0][0] > 0.1  # not buffered: the first came well before

        payload = {"inputs": "Hi", "parameters": {"max_new_tokens": 5, "details": True}}
        async with scene.session.post(
            scene.worker_url + "/generate", json=scene.envelope(payload, 102)
        ) as response:
            assert response.status == 200
            answer = await response.json()
        assert answer["details"]["generated_tokens"] == 5 and answer["generated_text"]

        # A shard dies of CUDA OOM mid-generation: the first fatal line, the root cause, is
        # what is reported, not the launcher's "ShardFailed" that follows it.
        async with scene.session.post(scene.model_url + "/control/crash") as response:
            assert response.status == 200
        errored = await scene.wait_report(lambda r: r["error_msg"] != "")
        assert errored["error_msg"] == f"model server error: {fake_tgi.OOM}"[:520]
        assert errored["max_perf"] == 0
        async with scene.session.get(scene.worker_url + "/status") as response:
            status = await response.json()
        assert status["log"]["matches"]["error"] == 3  # the OOM, "Shard 0 crashed", the exit
        async with scene.session.post(
            scene.worker_url + "/generate", json=scene.envelope(payload, 103)
        ) as response:
            assert response.status == 503
        assert await scene.finished(101) == "Success"
        assert await scene.finished(102) == "Success"
    finally:
        assert await stop(worker) == 0
        await stop(model)


async def test_a_failed_start_is_reported_and_never_ready(scene: Scene) -> None:
    model = await scene.start_model("--fail-start")
    worker = await scene.start_worker()
    try:
        # The OOM comes first, then "Shard 0 failed to start": the root cause is reported.
        errored = await scene.wait_report(lambda r: "CUDA out of memory" in r["error_msg"])
        assert errored["max_perf"] == 0 and errored["loadtime"] == 0
        assert all(report["max_perf"] == 0 for report in scene.autoscaler.worker_status)
    finally:
        assert await stop(worker) == 0
        await stop(model)
