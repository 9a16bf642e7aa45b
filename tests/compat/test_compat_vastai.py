"""Reference SDK workers, with only their import line changed, served by pyworker end to end.

Each `worker.py` below is shaped like one of the reference SDK's published examples (a first
tutorial worker, vLLM, TGI, ComfyUI behind its API wrapper) and written here, not copied. Each
runs as `python -m worker` in a folder holding only that file, as Vast's start script runs
it, in front of a fake model server that writes its log lines, and reports to a recording
autoscaler that also serves the key the signed requests are checked against.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import KeyPair
from tests.support.fake_autoscaler import FakeAutoscaler
from tests.support.processes import spawn, stop

REPOSITORY = Path(__file__).resolve().parents[2]
IMPORT_LINE = (
    "from pyworker.compat.vastai import "
    "Worker, WorkerConfig, HandlerConfig, BenchmarkConfig, LogActionConfig"
)

TUTORIAL = """
{import_line}

# A first worker: one route, requests one at a time, the workload from the prompt's length.
worker_config = WorkerConfig(
    model_server_url="http://127.0.0.1",
    model_server_port={port},
    model_log_file="{log}",
    handlers=[
        HandlerConfig(
            route="/generate",
            allow_parallel_requests=False,
            max_queue_time=20.0,
            workload_calculator=lambda payload: len(payload["inputs"]),
            benchmark_config=BenchmarkConfig(dataset=[{{"inputs": "hello world"}}], runs=2),
        )
    ],
    log_action_config=LogActionConfig(on_load=["Model loaded"], on_error=["Traceback"]),
)

Worker(worker_config).run()
"""

VLLM = """
import random

{import_line}

MODEL_SERVER_URL = "http://127.0.0.1"
MODEL_SERVER_PORT = {port}
MODEL_LOG_FILE = "{log}"
MODEL_HEALTHCHECK_ENDPOINT = "/health"

MODEL_LOAD_LOG_MSG = ["Application startup complete."]
MODEL_ERROR_LOG_MSGS = ["INFO exited: vllm", "RuntimeError: Engine", "Traceback (most recent"]
MODEL_INFO_LOG_MSGS = ['"message":"Download']


def completions_sample() -> dict:
    words = ["river", "stone", "cloud", "lamp"]
    prompt = " ".join(random.choice(words) for _ in range(12))
    return {{"model": "tiny", "prompt": prompt, "max_tokens": 16, "temperature": 0.7}}


def requested_tokens(payload: dict) -> float:
    return payload.get("max_tokens", 0)


worker_config = WorkerConfig(
    model_server_url=MODEL_SERVER_URL,
    model_server_port=MODEL_SERVER_PORT,
    model_log_file=MODEL_LOG_FILE,
    model_healthcheck_url=MODEL_HEALTHCHECK_ENDPOINT,
    handlers=[
        HandlerConfig(
            route="/v1/completions",
            allow_parallel_requests=True,
            max_queue_time=60.0,
            workload_calculator=requested_tokens,
            benchmark_config=BenchmarkConfig(
                generator=completions_sample, concurrency=4, runs=2
            ),
        ),
        HandlerConfig(
            route="/v1/chat/completions",
            allow_parallel_requests=True,
            max_queue_time=60.0,
            workload_calculator=requested_tokens,
        ),
    ],
    log_action_config=LogActionConfig(
        on_load=MODEL_LOAD_LOG_MSG,
        on_error=MODEL_ERROR_LOG_MSGS,
        on_info=MODEL_INFO_LOG_MSGS,
    ),
)

Worker(worker_config).run()
"""

TGI = """
{import_line}

BENCHMARK_PROMPTS = ["Tell me a story", "Explain tides", "Name three rivers"]


def new_tokens(payload: dict) -> float:
    return payload["parameters"]["max_new_tokens"]


worker_config = WorkerConfig(
    model_server_url="http://127.0.0.1",
    model_server_port={port},
    model_log_file="{log}",
    model_healthcheck_url="/health",
    handlers=[
        HandlerConfig(
            route="/generate",
            allow_parallel_requests=True,
            max_queue_time=60.0,
            workload_calculator=new_tokens,
            benchmark_config=BenchmarkConfig(
                dataset=[
                    {{"inputs": prompt, "parameters": {{"max_new_tokens": 8}}}}
                    for prompt in BENCHMARK_PROMPTS
                ],
                runs=2,
                concurrency=3,
            ),
        ),
        HandlerConfig(
            route="/generate_stream",
            allow_parallel_requests=True,
            max_queue_time=60.0,
            workload_calculator=new_tokens,
        ),
    ],
    log_action_config=LogActionConfig(
        on_load=['"message":"Connected"'],
        on_error=['"level":"ERROR"', "Error: ShardCannotStart"],
        on_info=['"message":"Download'],
    ),
)

Worker(worker_config).run()
"""

COMFYUI = """
import uuid

from aiohttp import web

{import_line}


def with_request_id(payload: dict) -> dict:
    payload.setdefault("input", {{}}).setdefault("request_id", str(uuid.uuid4()))
    return payload


def image_cost(payload: dict) -> float:
    workflow = payload["input"]["workflow_json"]
    steps = workflow["sampler"]["steps"]
    pixels = workflow["latent"]["width"] * workflow["latent"]["height"]
    return steps * pixels / (512 * 512)


async def images_only(client_request, model_response):
    answer = await model_response.json()
    images = [item["filename"] for item in answer.get("output", [])]
    return web.json_response({{"images": images}}, status=model_response.status)


BENCHMARK_WORKFLOW = {{
    "input": {{
        "workflow_json": {{
            "sampler": {{"steps": 4}},
            "latent": {{"width": 512, "height": 512}},
        }}
    }}
}}

worker_config = WorkerConfig(
    model_server_url="http://127.0.0.1",
    model_server_port={port},
    model_log_file="{log}",
    handlers=[
        HandlerConfig(
            route="/generate/sync",
            allow_parallel_requests=False,
            max_queue_time=30.0,
            request_parser=with_request_id,
            workload_calculator=image_cost,
            response_generator=images_only,
            benchmark_config=BenchmarkConfig(dataset=[BENCHMARK_WORKFLOW], runs=2),
        )
    ],
    log_action_config=LogActionConfig(
        on_load=["To see the GUI go to: "],
        on_error=["MetadataIncompleteBuffer", "Value not in list: "],
    ),
)

Worker(worker_config).run()
"""


class FakeModelServer:
    """One loopback server with the APIs of the examples; it logs like a model starting up."""

    def __init__(self, log: Path, loaded_line: str) -> None:
        self.log = log
        self.loaded_line = loaded_line
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.server = TestServer(self._app(), host="127.0.0.1", port=0)

    @property
    def port(self) -> int:
        port = self.server.port
        assert port is not None
        return port

    def requests_to(self, path: str) -> list[dict[str, Any]]:
        return [payload for where, payload in self.received if where == path]

    async def __aenter__(self) -> FakeModelServer:
        await self.server.start_server()
        lines = ["starting model server", "loading weights", self.loaded_line]
        self.log.write_text("".join(line + "\n" for line in lines))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.server.close()

    def _app(self) -> web.Application:
        app = web.Application()
        for path in ("/generate", "/v1/completions", "/v1/chat/completions", "/generate/sync"):
            app.router.add_post(path, self._answer)
        app.router.add_post("/generate_stream", self._stream)
        app.router.add_get("/health", self._health)
        return app

    async def _answer(self, request: web.Request) -> web.Response:
        payload = await request.json()
        self.received.append((request.path, payload))
        if request.path == "/generate":
            return web.json_response({"generated_text": f"echo: {payload['inputs']}"})
        if request.path == "/generate/sync":
            request_id = payload["input"].get("request_id", "benchmark")
            output = [{"filename": f"{request_id}.png", "url": "file:///tmp/out.png"}]
            return web.json_response({"id": request_id, "status": "completed", "output": output})
        tokens = int(payload.get("max_tokens", 4))
        usage = {"prompt_tokens": 3, "completion_tokens": tokens}
        return web.json_response({"choices": [{"text": "x" * tokens}], "usage": usage})

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        payload = await request.json()
        self.received.append((request.path, payload))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for index in range(payload["parameters"]["max_new_tokens"]):
            await response.write(f'data: {{"token": {{"id": {index}}}}}\n\n'.encode())
        await response.write_eof()
        return response

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})


@dataclass(frozen=True)
class Example:
    source: str
    loaded_line: str
    route: str
    payload: dict[str, Any]
    workload: float
    check_answer: Callable[[int, bytes], None]
    error_line: str


def _json_where(predicate: Callable[[Any], bool]) -> Callable[[int, bytes], None]:
    def check(status: int, body: bytes) -> None:
        assert status == 200, body
        assert predicate(json.loads(body)), body

    return check


def _streamed_tokens(count: int) -> Callable[[int, bytes], None]:
    def check(status: int, body: bytes) -> None:
        assert status == 200, body
        assert body.count(b"data: ") == count

    return check


EXAMPLES = {
    "tutorial": Example(
        TUTORIAL,
        "Model loaded",
        "/generate",
        {"inputs": "seven!!"},
        7.0,
        _json_where(lambda answer: answer == {"generated_text": "echo: seven!!"}),
        "Traceback (most recent call last):",
    ),
    "vllm": Example(
        VLLM,
        "INFO:     Application startup complete.",
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 24},
        24.0,
        _json_where(lambda answer: answer["usage"]["completion_tokens"] == 24),
        "ERROR 11-30 10:01:00 engine.py:135] RuntimeError: Engine loop has died",
    ),
    "tgi": Example(
        TGI,
        '{"timestamp":"2026-11-30T10:00:00Z","level":"INFO","message":"Connected"}',
        "/generate_stream",
        {"inputs": "hello", "parameters": {"max_new_tokens": 5}},
        5.0,
        _streamed_tokens(5),
        '{"level":"ERROR","message":"Shard complete standard error output: CUDA OOM"}',
    ),
    "comfyui": Example(
        COMFYUI,
        "To see the GUI go to: http://127.0.0.1:18188",
        "/generate/sync",
        {
            "input": {
                "request_id": "job-1",
                "workflow_json": {
                    "sampler": {"steps": 20},
                    "latent": {"width": 1024, "height": 512},
                },
            }
        },
        40.0,
        _json_where(lambda answer: answer == {"images": ["job-1.png"]}),
        "Value not in list: ckpt_name: 'missing.safetensors'",
    ),
}


@dataclass
class Scene:
    folder: Path
    autoscaler: FakeAutoscaler
    keypair: KeyPair

    def env(self) -> dict[str, str]:
        environ = dict(os.environ)
        environ.update(
            REPORT_ADDR=self.autoscaler.url,
            CONTAINER_ID="11",
            MASTER_TOKEN="token",
            UNSECURED="false",
            PYWORKER_CACHE_DIR=str(self.folder / "cache"),
            PYTHONPATH=str(REPOSITORY),
            WORKER_PORT="0",
            WORKER_HTTP_PORT="0",
            WORKER_HOST="127.0.0.1",
        )
        return environ

    def write_worker(self, source: str, port: int, log: Path) -> None:
        text = source.format(import_line=IMPORT_LINE, port=port, log=log)
        (self.folder / "worker.py").write_text(text)

    async def wait_report(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30.0
    ) -> dict[str, Any]:
        return await self.autoscaler.wait_report(predicate, timeout=timeout)


@pytest.fixture
async def scene(tmp_path: Path, keypair: KeyPair) -> AsyncIterator[Scene]:
    # The worker runs in the test's working folder (a fresh one, tests/conftest.py), as
    # `python -m worker` runs in the clone that holds worker.py.
    async with FakeAutoscaler(keypair.pem) as autoscaler:
        yield Scene(Path.cwd(), autoscaler, keypair)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
async def test_reference_worker_runs_with_its_import_line_changed(
    scene: Scene, tmp_path: Path, name: str
) -> None:
    example = EXAMPLES[name]
    async with FakeModelServer(tmp_path / "model.log", example.loaded_line) as model:
        scene.write_worker(example.source, model.port, model.log)
        worker, url = await spawn("-m", "worker", env=scene.env())
        try:
            ready = await scene.wait_report(lambda report: report["max_perf"] > 0)
            assert ready["url"] == url and ready["error_msg"] == ""
            benchmarked = len(model.received)
            assert benchmarked > 0  # the benchmark ran against the model server

            # The signed cost differs from the workload: the calculator decides the workload.
            auth = scene.keypair.auth_data(url, request_idx=4242, cost=1)
            body = {"auth_data": auth, "payload": example.payload}
            async with (
                aiohttp.ClientSession() as session,
                session.post(url + example.route, json=body) as answer,
            ):
                example.check_answer(answer.status, await answer.read())
            assert len(model.received) == benchmarked + 1
            assert model.received[-1][0] == example.route

            def reported_load() -> float:
                return float(sum(report["new_load"] for report in scene.autoscaler.worker_status))

            await scene.wait_report(lambda report: reported_load() > 0)
            assert reported_load() == pytest.approx(example.workload)

            unsigned = {**body, "auth_data": {**auth, "signature": "bm90IGEgc2lnbmF0dXJl"}}
            async with (
                aiohttp.ClientSession() as session,
                session.post(url + example.route, json=unsigned) as answer,
            ):
                assert answer.status == 401
            assert len(model.received) == benchmarked + 1

            # An on_error line in the model's log: reported, and requests are refused meanwhile.
            with model.log.open("a") as log:
                log.write(example.error_line + "\n")
            errored = await scene.wait_report(lambda report: report["error_msg"] != "")
            assert example.error_line in errored["error_msg"]
            async with (
                aiohttp.ClientSession() as session,
                session.post(url + example.route, json=body) as answer,
            ):
                assert answer.status == 503
        finally:
            assert await stop(worker) == 0


async def test_a_cache_hit_writes_the_marker_in_a_fresh_working_folder(
    scene: Scene, tmp_path: Path
) -> None:
    """The reference's tooling reads `.has_benchmark` in the folder the worker runs in: a new
    clone of the template on a machine that benchmarked this model before gets it too."""
    example = EXAMPLES["tutorial"]
    async with FakeModelServer(tmp_path / "model.log", example.loaded_line) as model:
        scene.write_worker(example.source, model.port, model.log)
        worker, _ = await spawn("-m", "worker", env=scene.env())
        try:
            measured = await scene.wait_report(lambda report: report["max_perf"] > 0)
        finally:
            assert await stop(worker) == 0
        assert float((scene.folder / ".has_benchmark").read_text()) > 0
        benchmarked = len(model.received)
        victim = tmp_path / "victim"
        victim.write_text("not the worker's")
        for name, marker_before in (("fresh", None), ("linked", victim)):
            folder = tmp_path / name
            folder.mkdir()
            (folder / "worker.py").write_text((scene.folder / "worker.py").read_text())
            marker = folder / ".has_benchmark"
            if marker_before is not None:
                marker.symlink_to(marker_before)  # never written through
            after = len(scene.autoscaler.worker_status)
            worker, _ = await spawn("-m", "worker", env=scene.env(), cwd=folder)
            try:
                ready = await scene.autoscaler.wait_report(
                    lambda report: report["max_perf"] > 0, after, timeout=30
                )
                assert ready["max_perf"] == measured["max_perf"]
                assert len(model.received) == benchmarked  # a cache hit: no benchmark ran
            finally:
                assert await stop(worker) == 0
            assert not marker.is_symlink() and float(marker.read_text()) > 0, name
        assert victim.read_text() == "not the worker's"
        assert float((tmp_path / "fresh" / ".has_benchmark").read_text()) == float(
            (scene.folder / ".has_benchmark").read_text()
        )


REFUSED = {
    "handler_class": (
        'HandlerConfig(route="/generate", handler_class=object, '
        'benchmark_config=BenchmarkConfig(dataset=[{"inputs": "x"}]))',
        "handlers[0].handler_class",
        "RouteConfig(",
    ),
    "payload_class": (
        'HandlerConfig(route="/generate", payload_class=dict, '
        'benchmark_config=BenchmarkConfig(dataset=[{"inputs": "x"}]))',
        "handlers[0].payload_class",
        "request_parser",
    ),
}

REFUSED_WORKER = """
{import_line}

worker_config = WorkerConfig(
    model_server_url="http://127.0.0.1",
    model_server_port=18000,
    handlers=[
    {handler}
    ],
)

Worker(worker_config).run()
"""


@pytest.mark.parametrize("field", ["handler_class", "payload_class"])
async def test_a_field_pyworker_cannot_honour_stops_the_start_naming_it(
    scene: Scene, field: str
) -> None:
    handler, named, advice = REFUSED[field]
    source = REFUSED_WORKER.format(import_line=IMPORT_LINE, handler=handler)
    await _assert_refused(scene, source, named, advice)


IN_PROCESS = """
import asyncio
from pathlib import Path

{import_line}

JOURNAL = Path("journal.txt")


def note(line):
    with JOURNAL.open("a") as journal:
        journal.write(line + "\\n")


class Model:
    # What a deployment loads in the worker's own process: here, a table of word scores.
    async def __aenter__(self):
        note("enter")
        {enter}
        self.scores = {{"good": 1.0, "bad": -1.0}}
        return self

    async def __aexit__(self, *exc_info):
        note("exit")


model = Model()


async def score(text, weight=1.0):
    await asyncio.sleep(0)
    return weight * sum(model.scores.get(word, 0.0) for word in text.split())


worker_config = WorkerConfig(
    handlers=[
        HandlerConfig(
            route="/score",
            allow_parallel_requests=True,
            is_remote_dispatch=True,
            remote_function=score,
            workload_calculator=lambda payload: len(payload["text"].split()),
            benchmark_config=BenchmarkConfig(dataset=[{{"text": "good good bad"}}], runs=2),
        )
    ],
    lifecycle=model,
)

Worker(worker_config).run()
"""


def journal(scene: Scene) -> list[str]:
    path = scene.folder / "journal.txt"
    return path.read_text().split() if path.exists() else []


async def test_a_reference_lifecycle_and_remote_function_serve_in_process(scene: Scene) -> None:
    source = IN_PROCESS.format(import_line=IMPORT_LINE, enter="await asyncio.sleep(0)")
    (scene.folder / "worker.py").write_text(source)
    worker, url = await spawn("-m", "worker", env=scene.env())
    try:
        ready = await scene.wait_report(lambda report: report["max_perf"] > 0)
        assert ready["error_msg"] == "" and journal(scene) == ["enter"]
        # The benchmark drove the function: 3 words a request, so the perf counts words.
        auth = scene.keypair.auth_data(url, request_idx=77, cost=1)
        body = {"auth_data": auth, "payload": {"text": "good good bad good", "weight": 2}}
        async with (
            aiohttp.ClientSession() as session,
            session.post(url + "/score", json=body) as answer,
        ):
            assert (answer.status, await answer.json()) == (200, {"result": 4.0})
        loads = await scene.wait_report(lambda report: report["new_load"] > 0)
        assert loads["new_load"] == pytest.approx(4.0)  # the workload calculator's
        unsigned = {**body, "auth_data": {**auth, "signature": "bm90IGEgc2lnbmF0dXJl"}}
        async with (
            aiohttp.ClientSession() as session,
            session.post(url + "/score", json=unsigned) as answer,
        ):
            assert answer.status == 401
    finally:
        assert await stop(worker) == 0
    assert journal(scene) == ["enter", "exit"]


async def test_a_reference_lifecycle_that_fails_is_the_error_msg(scene: Scene) -> None:
    source = IN_PROCESS.format(import_line=IMPORT_LINE, enter='raise OSError("CUDA out of memory")')
    (scene.folder / "worker.py").write_text(source)
    worker, url = await spawn("-m", "worker", env=scene.env())
    try:
        errored = await scene.wait_report(lambda report: report["error_msg"] != "")
        assert "model lifecycle Model failed to load" in errored["error_msg"]
        assert "CUDA out of memory" in errored["error_msg"]
        async with aiohttp.ClientSession() as session, session.get(url + "/health") as health:
            assert health.status == 200
    finally:
        assert await stop(worker) == 0
    assert journal(scene) == ["enter"]


STREAMING_WORKER = """
from aiohttp import web

{import_line}


async def relay(client_request, model_response):
    streamed = web.StreamResponse()
    await streamed.prepare(client_request)
    async for chunk in model_response.content.iter_any():
        await streamed.write(chunk)
    await streamed.write_eof()
    return streamed


worker_config = WorkerConfig(
    model_server_port=18000,
    handlers=[
        HandlerConfig(
            route="/generate_stream",
            response_generator=relay,
            benchmark_config=BenchmarkConfig(dataset=[{{"inputs": "x"}}]),
        )
    ],
)
Worker(worker_config).run()
"""


async def test_a_streaming_response_generator_stops_the_start_saying_what_to_do(
    scene: Scene,
) -> None:
    source = STREAMING_WORKER.format(import_line=IMPORT_LINE)
    advice = "remove the response_generator from this handler"
    await _assert_refused(scene, source, "handlers[0].response_generator", advice)


async def _assert_refused(scene: Scene, source: str, named: str, advice: str) -> None:
    (scene.folder / "worker.py").write_text(source)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        env=scene.env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2, stderr.decode()
    message = stderr.decode()
    assert f"pyworker: {named}:" in message
    assert advice in message
    assert b"listening" not in stdout
    assert scene.autoscaler.worker_status == []
