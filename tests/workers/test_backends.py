"""Vast's backend names: `pyworker run <name>` and `python -m workers.<name>.worker`.

Each name resolves to its engine's defaults (port, health route, log lines, routes), each
default gives way to the variables Vast's templates set, and four of them run as real
processes, the way Vast's start script runs them, in front of a recording fake engine.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from pyworker.config import WorkerConfig
from pyworker.config.loader import load_config
from pyworker.config.template_env import TemplateEnvError, existing_log
from pyworker.lifecycle.logfollow import LineKind, LogFollower
from pyworker.lifecycle.readiness import log_patterns
from pyworker.workers.comfyui_json import worker as comfyui_json
from pyworker.workers.openai.engines import PROFILES, ServerKind
from pyworker.workers.openai.routes import ALL_ROUTES
from pyworker.workers.openai.worker import build_worker as openai_worker
from pyworker.workers.tgi.worker import build_worker as tgi_worker
from pyworker.workers.vllm_score import worker as vllm_score
from tests.conftest import KeyPair
from tests.support.fake_engines import EngineRecorder, create_app
from tests.support.processes import spawn, stop

REPOSITORY = Path(__file__).resolve().parents[2]
VLLM_LOADED = "(APIServer pid=460954) INFO:     Application startup complete."
SGLANG_LOADED = "[2025-04-03 04:47:15] The server is fired up and ready to roll!"
LLAMA_LOADED = "0.00.013.526 I srv  llama_server: model loaded"
TGI_LOADED = (
    "2024-09-03T02:47:53.402023Z  INFO text_generation_router::server: "
    "router/src/server.rs:2311: Connected"
)
WRAPPER_LOADED = "2025-11-02 10:00:04,112 INFO api-wrapper: BACKENDS_READY (1/1 backends)"
OPENAI_ROUTES = list(ALL_ROUTES)  # every OpenAI route the openai worker serves
SCORE_ROUTES = ["/score", "/v1/score", "/rerank", "/v1/rerank"]

BACKENDS: dict[str, tuple[str, int, list[str], str]] = {
    # name: (config name, engine port, routes, the engine's real load line)
    "vllm": ("openai-vllm", 18000, OPENAI_ROUTES, VLLM_LOADED),
    "sglang": ("openai-sglang", 18000, OPENAI_ROUTES, SGLANG_LOADED),
    "llama": ("openai-llamacpp", 18000, OPENAI_ROUTES, LLAMA_LOADED),
    "openai": ("openai-vllm", 18000, OPENAI_ROUTES, VLLM_LOADED),
    "tgi": ("tgi", 5001, ["/generate", "/generate_stream"], TGI_LOADED),
    "comfyui-json": ("comfyui-json", 18288, ["/generate/sync"], WRAPPER_LOADED),
    "vllm-score": ("vllm-score", 18000, SCORE_ROUTES, VLLM_LOADED),
}


def classify(config: WorkerConfig, line: str) -> LineKind | None:
    pattern = LogFollower("unused.log", log_patterns(config)).classify(line)
    return None if pattern is None else pattern.kind


# --- pyworker run <name>: what each name resolves to ---------------------------------------
@pytest.mark.parametrize("name", list(BACKENDS))
def test_each_backend_name_resolves_to_its_engine_defaults(name: str) -> None:
    config_name, port, routes, loaded = BACKENDS[name]
    for target in {name, name.replace("-", "_")}:  # the dashed name and the importable one
        config = load_config(target, environ={})
        assert config.name == config_name
        assert config.model_server.base_url == f"http://127.0.0.1:{port}"
        assert config.model_server.health_path == "/health"
        assert [route.path for route in config.routes] == routes
        assert config.benchmark.route == routes[0]
        assert classify(config, loaded) is LineKind.LOADED
        assert config.model_server.log_file is None  # Vast's log path is not on this machine


def test_openai_is_vllm_unless_openai_server_names_another(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_SERVER", "sglang")
    assert load_config("openai", environ={}).name == "openai-sglang"
    assert load_config("vllm", environ={}).name == "openai-vllm"  # a fixed engine ignores it
    assert load_config("llama", environ={}).name == "openai-llamacpp"


def test_the_engines_log_lines_are_their_own() -> None:
    sglang = load_config("sglang", environ={})
    assert classify(sglang, SGLANG_LOADED) is LineKind.LOADED
    assert classify(sglang, VLLM_LOADED.replace("(APIServer pid=460954) ", "")) is None
    wrapper = load_config("comfyui-json", environ={})
    timeout = "2025-11-02 10:10:00,000 ERROR api-wrapper: BACKENDS_READY_TIMEOUT after 600 s"
    assert classify(wrapper, timeout) is LineKind.ERROR
    for line in ("BACKEND_UNRECOVERABLE: CUDA error on backend 0", "Application startup failed."):
        assert classify(wrapper, line) is LineKind.ERROR
    exited = "2025-06-02 10:14:07,512 INFO exited: vllm (exit status 1; not expected)"
    assert classify(load_config("vllm-score", environ={}), exited) is LineKind.ERROR


# --- the template's variables --------------------------------------------------------------
Builder = Callable[[Mapping[str, str]], WorkerConfig]
BUILDERS: dict[str, Builder] = {
    "vllm": lambda env: openai_worker(env, ServerKind.VLLM),
    "sglang": lambda env: openai_worker(env, ServerKind.SGLANG),
    "llama": lambda env: openai_worker(env, ServerKind.LLAMACPP),
    "tgi": tgi_worker,
    "comfyui-json": comfyui_json.build_worker,
    "vllm-score": vllm_score.build_worker,
}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_the_engine_port_comes_from_model_server_port(name: str) -> None:
    build = BUILDERS[name]
    assert build({"MODEL_SERVER_PORT": "9123"}).model_server.base_url == "http://127.0.0.1:9123"
    for bad in ("http://x", "0", "70000", "-1"):
        with pytest.raises(TemplateEnvError, match="MODEL_SERVER_PORT"):
            build({"MODEL_SERVER_PORT": bad})


def test_model_server_url_log_and_health_variables_win(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MODEL_SERVER_PORT", "9123")
    log = tmp_path / "engine.log"
    environ = {
        "MODEL_SERVER_URL": "http://127.0.0.1:7000",
        "MODEL_LOG": str(log),
        "MODEL_HEALTH_ENDPOINT": "/ping",
    }
    for name in BACKENDS:
        server = load_config(name, environ=environ).model_server
        assert (server.base_url, server.log_file, server.health_path) == (
            "http://127.0.0.1:7000",
            str(log),
            "/ping",
        ), name


@pytest.mark.parametrize(
    ("name", "environ", "model"),
    [
        ("vllm", {"MODEL_NAME": "Qwen/Qwen3-8B", "VLLM_MODEL": "other"}, "Qwen/Qwen3-8B"),
        ("vllm", {"VLLM_MODEL": "Qwen/Qwen3-8B"}, "Qwen/Qwen3-8B"),
        ("vllm", {"OPENAI_MODEL": "mine", "MODEL_NAME": "theirs"}, "mine"),
        ("sglang", {"SGLANG_MODEL": "s/m"}, "s/m"),
        ("sglang", {"VLLM_MODEL": "v/m"}, None),  # another engine's variable is not this one's
        ("llama", {"LLAMA_MODEL": "unsloth/gemma:Q4_K_M"}, "unsloth/gemma:Q4_K_M"),
        ("tgi", {"MODEL_ID": "tiiuae/falcon-7b"}, "tiiuae/falcon-7b"),
        ("comfyui-json", {"COMFY_MODEL": "flux"}, "flux"),
        ("vllm-score", {"MODEL_NAME": "Qwen/Qwen3-Reranker-0.6B"}, "Qwen/Qwen3-Reranker-0.6B"),
        ("vllm-score", {"MODEL_NAME": "  "}, None),
    ],
)
def test_the_served_model_comes_from_the_templates_variables(
    name: str, environ: dict[str, str], model: str | None
) -> None:
    config = BUILDERS[name](environ)
    assert config.model_server.model_id == model
    dataset = config.benchmark.dataset or []
    if name in ("vllm", "sglang", "llama", "vllm-score"):
        assert dataset and all(payload.get("model") == model for payload in dataset)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_the_image_may_replace_the_log_grammar(name: str) -> None:
    default = BUILDERS[name]({}).model_server
    grammar = {"MODEL_LOAD_LOG_MSG": "  Ready to serve\n\n  second line  \n"}
    server = BUILDERS[name](grammar | {"MODEL_ERROR_LOG_MSGS": "boom"}).model_server
    assert server.load_patterns == ["Ready to serve", "second line"]
    assert server.error_patterns == ["boom"]
    assert server.info_patterns == default.info_patterns
    replaced = BUILDERS[name]({"MODEL_INFO_LOG_MSGS": "Downloading"}).model_server
    assert replaced.info_patterns == ["Downloading"]
    assert replaced.load_patterns == default.load_patterns


def test_vast_log_paths_are_used_when_the_file_is_there(tmp_path: Path) -> None:
    assert PROFILES[ServerKind.VLLM].log_file == "/var/log/portal/vllm.log"
    assert PROFILES[ServerKind.SGLANG].log_file == "/var/log/portal/sglang.log"
    assert PROFILES[ServerKind.LLAMACPP].log_file == "/var/log/portal/llama.log"
    assert comfyui_json.WRAPPER_LOG == "/var/log/portal/api-wrapper.log"
    present = tmp_path / "vllm.log"
    present.write_text("")
    assert existing_log(str(present)) == str(present)
    assert existing_log(str(tmp_path / "absent.log")) is None
    assert existing_log(None) is None


# --- comfyui-json: the wrapper's request shapes and the benchmark ---------------------------
MODIFIER_JOB = {
    "input": {
        "request_id": "abc",
        "modifier": "Text2Image",
        "modifications": {"prompt": "a cat", "width": 512, "height": 512, "steps": 20},
        "s3": {"bucket_name": "b"},
        "webhook": {"url": "https://example.invalid/hook"},
    }
}
WORKFLOW_JOB = {
    "input": {
        "workflow_json": {
            "3": {"class_type": "KSampler", "inputs": {"seed": "__RANDOM_INT__", "steps": 4}}
        }
    }
}


def test_comfyui_json_accepts_both_shapes_unchanged_and_refuses_no_input() -> None:
    for job in (MODIFIER_JOB, WORKFLOW_JOB):
        assert comfyui_json.check_payload(job) is job
    bad: list[tuple[Any, str]] = [
        ({}, "`input` must be an object"),
        ({"input": "x"}, "`input` must be an object"),
        ({"input": {"workflow_json": "{}"}}, "input.workflow_json"),
        ({"input": {"modifier": 3}}, "input.modifier"),
    ]
    for payload, message in bad:
        with pytest.raises(ValueError, match=message):
            comfyui_json.check_payload(payload)


def test_comfyui_json_fallback_benchmark_is_text2image_from_the_variables() -> None:
    environ = {"BENCHMARK_TEST_WIDTH": "768", "BENCHMARK_TEST_HEIGHT": "640"}
    payloads = comfyui_json.benchmark_payloads(environ, 4, candidates=[])
    assert payloads == comfyui_json.benchmark_payloads(environ, 4, candidates=[])  # stable
    seeds = {p["input"]["modifications"]["seed"] for p in payloads}
    assert len(seeds) == 4  # ComfyUI would answer a repeated job from its cache
    for payload in payloads:
        job = payload["input"]
        assert job["modifier"] == "Text2Image" and "workflow_json" not in job
        assert {k: job["modifications"][k] for k in ("width", "height", "steps")} == {
            "width": 768,
            "height": 640,
            "steps": 20,
        }
        assert job["modifications"]["prompt"]
    with pytest.raises(ValueError, match="BENCHMARK_TEST_STEPS"):
        comfyui_json.benchmark_payloads({"BENCHMARK_TEST_STEPS": "many"}, 1, candidates=[])


def test_comfyui_json_custom_workflow_tiers_in_the_reference_order(tmp_path: Path) -> None:
    configured = tmp_path / "configured.json"
    environ = {"BENCHMARK_JSON_PATH": str(configured)}
    assert comfyui_json.workflow_candidates(environ) == [
        comfyui_json.FORK_WORKFLOW,
        configured,
        comfyui_json.IMAGE_WORKFLOW,
    ]
    assert comfyui_json.workflow_candidates({})[-1] == Path(
        "/opt/comfyui-api-wrapper/workflows/pyworker_benchmark.json"
    )
    fork, image = tmp_path / "fork.json", tmp_path / "image.json"
    fork.write_text("{not json")  # a broken file falls through to the next tier
    configured.write_text(json.dumps(WORKFLOW_JOB["input"]["workflow_json"]))
    image.write_text(json.dumps({"9": {"class_type": "SaveImage", "inputs": {}}}))
    payloads = comfyui_json.benchmark_payloads({}, 2, candidates=[fork, configured, image])
    assert [p["input"]["workflow_json"] for p in payloads] == [
        WORKFLOW_JOB["input"]["workflow_json"]
    ] * 2
    assert {p["input"]["request_id"] for p in payloads} == {"benchmark-0", "benchmark-1"}


def test_comfyui_json_route_is_fifo_and_weighs_100_a_job() -> None:
    config = comfyui_json.build_worker({})
    (route,) = config.routes
    assert route.fifo and route.max_queue_time == 10.0
    assert route.compute_workload(WORKFLOW_JOB, cost=0) == 100.0
    assert route.compute_workload(MODIFIER_JOB, cost=0) == 100.0
    assert config.benchmark.concurrency == 1 and len(config.benchmark.dataset or []) == 64


# --- vllm-score: workload in tokens of every pair read -------------------------------------
def test_score_workload_counts_every_pair_in_vllms_shapes() -> None:
    query, document = "abcd" * 3, "abcd" * 10  # 3 and 10 tokens
    one_to_many = {"text_1": query, "text_2": [document, document]}
    assert vllm_score.score_workload(one_to_many) == 2 * (3 + 10)
    assert vllm_score.score_workload({"text_1": [query], "text_2": [document] * 3}) == 3 * 13
    pairwise = {"text_1": [query, document], "text_2": [document, query]}
    assert vllm_score.score_workload(pairwise) == 26
    assert vllm_score.score_workload({"queries": query, "documents": [document]}) == 13
    assert vllm_score.score_workload({"queries": query, "items": [document]}) == 13
    assert vllm_score.score_workload({"input": one_to_many}) == 26
    assert vllm_score.rerank_workload({"query": query, "documents": [document, document]}) == 26
    with_objects = {"query": query, "documents": [{"text": document}]}
    assert vllm_score.rerank_workload(with_objects) == 13
    for odd in ({}, {"text_1": 5}, {"query": None, "documents": "x"}, {"documents": [[1, 2]]}):
        assert vllm_score.score_workload(odd) >= 1 and vllm_score.rerank_workload(odd) >= 1


def test_score_benchmark_route_and_shape_follow_benchmark_route() -> None:
    score = vllm_score.build_worker({"MODEL_NAME": "r"})
    assert score.benchmark.route == "/score"
    first = (score.benchmark.dataset or [])[0]
    assert set(first) == {"text_1", "text_2", "model"} and isinstance(first["text_2"], list)
    rerank = vllm_score.build_worker({"BENCHMARK_ROUTE": "/v1/rerank"})
    assert rerank.benchmark.route == "/v1/rerank"
    assert set((rerank.benchmark.dataset or [])[0]) == {"query", "documents"}
    with pytest.raises(ValueError, match="BENCHMARK_ROUTE='/v1/completions'"):
        vllm_score.build_worker({"BENCHMARK_ROUTE": "/v1/completions"})


# --- real processes, as Vast's start script runs them --------------------------------------
class Engine:
    def __init__(self, server: TestServer, recorder: EngineRecorder) -> None:
        self.server = server
        self.recorder = recorder

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    recorder = EngineRecorder()
    server = TestServer(create_app(recorder), host="127.0.0.1")
    await server.start_server()
    yield Engine(server, recorder)
    await server.close()


class Running:
    def __init__(self, url: str, session: aiohttp.ClientSession, keypair: KeyPair) -> None:
        self.url = url
        self.session = session
        self.keypair = keypair

    async def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            async with self.session.get(self.url + "/ready") as response:
                if response.status == 200:
                    return
            await asyncio.sleep(0.02)
        raise AssertionError("worker never became ready")

    async def call(self, path: str, payload: Any) -> tuple[int, Any]:
        envelope = {"auth_data": self.keypair.auth_data(self.url), "payload": payload}
        async with self.session.post(self.url + path, json=envelope) as response:
            return response.status, await response.json(content_type=None)


@pytest.fixture
async def run_worker(tmp_path: Path, keypair: KeyPair) -> AsyncIterator[Callable[..., Any]]:
    processes: list[asyncio.subprocess.Process] = []
    session = aiohttp.ClientSession()

    async def start(*arguments: str, **variables: str) -> Running:
        environ = {
            key: value
            for key, value in os.environ.items()
            if key not in ("REPORT_ADDR", "CONTAINER_ID", "MODEL_SERVER_URL", "MODEL_LOG")
        }
        environ.update(
            PYTHONPATH=str(REPOSITORY),
            WORKER_PORT="0",
            PYWORKER_CACHE_DIR=str(tmp_path / "cache"),
            **variables,
        )
        process, url = await spawn(*arguments, env=environ)
        processes.append(process)
        return Running(url, session, keypair)

    yield start
    await session.close()
    for process in processes:
        assert await stop(process) == 0


def engine_log(tmp_path: Path, *lines: str) -> str:
    log = tmp_path / "engine.log"
    log.write_text("".join(line + "\n" for line in lines))
    return str(log)


async def test_python_m_workers_vllm_worker_serves_vllm(
    engine: Engine, run_worker: Callable[..., Any], tmp_path: Path
) -> None:
    worker = await run_worker(
        "-m", "workers.vllm.worker",
        MODEL_SERVER_PORT=str(engine.port),
        MODEL_NAME="Qwen/Qwen3-8B",
        MODEL_LOG=engine_log(tmp_path, "INFO 11-23 10:00:01 loading", VLLM_LOADED),
    )  # fmt: skip
    await worker.wait_ready()
    benchmark = engine.recorder.payloads("/v1/completions")
    assert benchmark and all(p["model"] == "Qwen/Qwen3-8B" for p in benchmark)
    chat = {"model": "Qwen/Qwen3-8B", "messages": [{"role": "user", "content": "Hi"}]}
    status, answer = await worker.call("/v1/chat/completions", chat)
    assert status == 200 and answer["usage"]["completion_tokens"] == 16
    assert engine.recorder.requests[-1].path == "/v1/chat/completions"
    assert engine.recorder.requests[-1].payload == chat


async def test_pyworker_run_sglang_serves_sglang(
    engine: Engine, run_worker: Callable[..., Any], tmp_path: Path
) -> None:
    worker = await run_worker(
        "-m", "pyworker", "run", "sglang",
        MODEL_SERVER_PORT=str(engine.port),
        SGLANG_MODEL="Qwen/Qwen2.5-7B-Instruct",
        MODEL_LOG=engine_log(tmp_path, SGLANG_LOADED),
    )  # fmt: skip
    await worker.wait_ready()
    benchmark = engine.recorder.payloads("/v1/completions")
    assert benchmark and all(p["model"] == "Qwen/Qwen2.5-7B-Instruct" for p in benchmark)
    status, answer = await worker.call("/v1/completions", {"prompt": "x", "max_tokens": 3})
    assert status == 200 and answer["choices"][0]["text"] == "xxx"


async def test_python_m_comfyui_json_against_the_wrapper(
    engine: Engine, run_worker: Callable[..., Any], tmp_path: Path
) -> None:
    engine.recorder.job_seconds = 0.05
    worker = await run_worker(
        "-m", "workers.comfyui-json.worker",
        MODEL_SERVER_PORT=str(engine.port),
        MODEL_LOG=engine_log(tmp_path, "INFO: Uvicorn running on 0.0.0.0:18288", WRAPPER_LOADED),
        BENCHMARK_TEST_STEPS="7",
    )  # fmt: skip
    await worker.wait_ready()
    benchmark = engine.recorder.payloads("/generate/sync")
    assert len(benchmark) > 1  # the first answer, then the ramp at one job at a time
    assert all(p["input"]["modifications"]["steps"] == 7 for p in benchmark)

    results = await asyncio.gather(
        worker.call("/generate/sync", MODIFIER_JOB), worker.call("/generate/sync", WORKFLOW_JOB)
    )
    assert [status for status, _ in results] == [200, 200]
    assert results[0][1]["id"] == "abc" and results[0][1]["status"] == "completed"
    assert engine.recorder.payloads("/generate/sync")[-2:] in (
        [MODIFIER_JOB, WORKFLOW_JOB],
        [WORKFLOW_JOB, MODIFIER_JOB],
    )
    assert engine.recorder.peak_jobs == 1  # ComfyUI runs one job at a time: so does the route

    sent = len(engine.recorder.requests)
    status, body = await worker.call("/generate/sync", {"modifier": "Text2Image"})
    assert status == 422 and "input" in body["error"]
    assert len(engine.recorder.requests) == sent  # refused here, never sent
    both = {"input": {"modifier": "Text2Image", "workflow_json": {"1": {}}}}
    status, body = await worker.call("/generate/sync", both)
    assert status == 422 and "mutually exclusive" in body["detail"][0]["msg"]  # the wrapper's


async def test_python_m_vllm_score_serves_score_and_rerank(
    engine: Engine, run_worker: Callable[..., Any], tmp_path: Path
) -> None:
    worker = await run_worker(
        "-m", "workers.vllm-score.worker",
        MODEL_SERVER_PORT=str(engine.port),
        MODEL_NAME="Qwen/Qwen3-Reranker-0.6B",
        MODEL_LOG=engine_log(tmp_path, VLLM_LOADED),
    )  # fmt: skip
    await worker.wait_ready()
    benchmark = engine.recorder.payloads("/score")
    assert benchmark and all(p["model"] == "Qwen/Qwen3-Reranker-0.6B" for p in benchmark)
    assert all(isinstance(p["text_1"], str) and p["text_2"] for p in benchmark)

    score = {"text_1": ["What is the capital of France?"], "text_2": ["Paris is."]}
    rerank = {"query": "capital of France", "documents": ["Paris is.", "Berlin is."]}
    for path, payload in (
        ("/score", score),
        ("/v1/score", {"input": score}),  # the reference's envelope, unwrapped
        ("/rerank", rerank),
        ("/v1/rerank", rerank),
    ):
        status, answer = await worker.call(path, payload)
        assert status == 200, (path, answer)
        assert engine.recorder.requests[-1].path == path
        assert engine.recorder.requests[-1].payload == payload.get("input", payload)
        assert ("data" in answer) if "score" in path else (len(answer["results"]) == 2)
