"""The `openai` worker's parts: workload, produced work from `usage`, and log patterns.

The log lines are real: vLLM, SGLang and TGI lines as they appear in those servers' logs
(quoted in pyworker/workers/openai/README.md), llama.cpp lines as our own llama-server build
prints them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pytest

from pyworker.lifecycle.benchmark import produced_documents
from pyworker.lifecycle.logfollow import LineKind, LogFollower
from pyworker.lifecycle.readiness import log_patterns
from pyworker.workers.openai.engines import ServerKind
from pyworker.workers.openai.worker import (
    BENCHMARK_FILE,
    CHAT,
    COMPLETIONS,
    DEFAULT_MAX_TOKENS,
    build_worker,
    produced_tokens,
    workload,
)

# --- workload -------------------------------------------------------------------------------


def test_completion_workload_is_prompt_estimate_plus_max_tokens() -> None:
    assert workload({"prompt": "hello world", "max_tokens": 10}) == 3 + 10  # ceil(11 / 4)
    assert workload({"prompt": [1, 2, 3, 4, 5], "max_tokens": 7}) == 5 + 7  # token ids count


def test_several_prompts_and_choices_multiply_the_generated_tokens() -> None:
    payload = {"prompt": ["abcd", "abcdefgh"], "max_tokens": 10, "n": 3}
    assert workload(payload) == (1 + 2) + 10 * 3 * 2
    assert workload({"prompt": [[1, 2], [3, 4, 5]], "max_tokens": 4}) == 5 + 4 * 2


def test_chat_workload_counts_every_message_and_text_part() -> None:
    payload = {
        "messages": [
            {"role": "system", "content": "12345678"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "1234"},
                    {"type": "image_url", "image_url": {"url": "data:,"}},
                ],
            },
        ],
        "max_completion_tokens": 20,
        "max_tokens": 999,
    }
    assert workload(payload) == (4 + 2) + (4 + 1) + 20


@pytest.mark.parametrize("limit", [None, "12", True, -5, [1]])
def test_an_unusable_limit_means_the_default(limit: object) -> None:
    assert workload({"prompt": "", "max_tokens": limit}) == DEFAULT_MAX_TOKENS
    assert workload({"prompt": "", "max_tokens": 8}, default_max_tokens=3) == 8
    assert workload({"messages": []}, default_max_tokens=3) == 3


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"prompt": {"a": 1}},
        {"prompt": [[["deeper", "than", "a", "prompt"]]]},
        {"messages": "hi"},
        {"messages": [1, None]},
        {"n": "x"},
        {"max_tokens": float("nan")},
        {"max_tokens": float("inf")},
    ],
)
def test_odd_payloads_still_get_a_finite_workload(payload: dict[str, object]) -> None:
    assert workload(payload) == DEFAULT_MAX_TOKENS


def test_routes_use_the_workload_and_the_default_from_the_environment() -> None:
    config = build_worker({"OPENAI_DEFAULT_MAX_TOKENS": "40"})
    assert [route.path for route in config.routes][:2] == [COMPLETIONS, CHAT]
    for route in config.routes[:2]:
        assert route.compute_workload({"prompt": "abcd"}, cost=0) == 1 + 40
        assert route.compute_workload({"prompt": "abcd", "max_tokens": 2}, cost=0) == 3
        assert route.produced_work is produced_tokens


# --- produced work --------------------------------------------------------------------------
# Shapes copied from real answers: llama-server (ours, trimmed) and vLLM's documented stream.
LLAMA_ANSWER = {
    "choices": [{"text": "vS(9", "index": 0, "logprobs": None, "finish_reason": "length"}],
    "created": 1795000000,
    "model": "tiny",
    "system_fingerprint": "b1-unknown",
    "object": "text_completion",
    "usage": {"completion_tokens": 4, "prompt_tokens": 8, "total_tokens": 12},
    "id": "chatcmpl-abc",
    "timings": {"prompt_n": 8, "predicted_n": 4},
}
LLAMA_STREAM = (
    'data: {"choices":[{"text":"vS","index":0,"logprobs":null,"finish_reason":null}],'
    '"object":"text_completion","model":"tiny"}\n\n'
    'data: {"choices":[{"text":"(9","index":0,"logprobs":null,"finish_reason":"length"}],'
    '"object":"text_completion","model":"tiny",'
    '"usage":{"completion_tokens":4,"prompt_tokens":8,"total_tokens":12},'
    '"timings":{"prompt_n":8,"predicted_n":4}}\n\n'
    "data: [DONE]\n\n"
)
VLLM_STREAM_WITH_USAGE = (
    'data: {"id":"cmpl-1","object":"chat.completion.chunk","choices":[{"index":0,'
    '"delta":{"content":"Hi"},"finish_reason":null}],"usage":null}\n\n'
    'data: {"id":"cmpl-1","object":"chat.completion.chunk","choices":[],'
    '"usage":{"prompt_tokens":17,"total_tokens":27,"completion_tokens":10}}\n\n'
    "data: [DONE]\n\n"
)
VLLM_STREAM_WITHOUT_USAGE = (
    'data: {"id":"cmpl-1","object":"chat.completion.chunk","choices":[{"index":0,'
    '"delta":{"content":"Hi"},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
)


def produced(body: str, content_type: str) -> float | None:
    """What the benchmark counts for an answer: the last document the hook has a value for."""
    value = None
    for document in produced_documents(body.encode(), content_type):
        found = produced_tokens(document)
        if found is not None:
            value = found
    return value


def test_produced_work_of_a_whole_answer_is_prompt_plus_completion_tokens() -> None:
    assert produced(json.dumps(LLAMA_ANSWER), "application/json") == 12


def test_produced_work_of_a_stream_comes_from_its_usage_chunk() -> None:
    assert produced(LLAMA_STREAM, "text/event-stream") == 12
    assert produced(VLLM_STREAM_WITH_USAGE, "text/event-stream") == 27
    assert produced(VLLM_STREAM_WITHOUT_USAGE, "text/event-stream") is None


@pytest.mark.parametrize(
    "usage",
    [
        None,
        "12",
        {},
        {"prompt_tokens": True, "completion_tokens": 1},
        {"prompt_tokens": -1, "completion_tokens": 1},
    ],
)
def test_no_usable_usage_means_no_produced_work(usage: object) -> None:
    assert produced_tokens({"usage": usage}) is None


def test_total_tokens_alone_is_enough() -> None:
    assert produced_tokens({"usage": {"total_tokens": 30}}) == 30
    assert produced_tokens({"usage": {"prompt_tokens": 3, "completion_tokens": 4}}) == 7


# --- servers: health routes and log patterns ------------------------------------------------
def classify(kind: ServerKind, line: str) -> LineKind | None:
    config = build_worker({"OPENAI_SERVER": kind.value})
    pattern = LogFollower("unused.log", log_patterns(config)).classify(line)
    return None if pattern is None else pattern.kind


LOADED_LINES = {
    ServerKind.VLLM: [
        "(APIServer pid=460954) INFO:     Application startup complete.",
        "INFO:     Application startup complete.",
    ],
    ServerKind.SGLANG: ["[2025-04-03 04:47:15] The server is fired up and ready to roll!"],
    ServerKind.LLAMACPP: [
        "0.00.013.526 I srv  llama_server: model loaded",  # our build, llama-cpp-python 0.3.36
        "srv  llama_server: model loaded",  # without --log-prefix/--log-timestamps
        "main: model loaded",  # older builds
    ],
    ServerKind.TGI: [
        "2024-09-03T02:47:53.402023Z  INFO text_generation_router::server: "
        "router/src/server.rs:2311: Connected",
        '{"timestamp":"2024-09-03T02:47:53.402023Z","level":"INFO","message":"Connected",'
        '"target":"text_generation_router::server","filename":"router/src/server.rs"}',
    ],
}
ERROR_LINES = {
    ServerKind.VLLM: [
        "(APIServer pid=1194908) ERROR 01-12 01:32:33 [async_llm.py:538] "
        "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue. "
        "See stack trace (above) for the root cause.",
        "RuntimeError: Engine core initialization failed. See root cause above. "
        "Failed core proc(s): {}",
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 224.00 MiB.",
        "ValueError: To serve at least one request with the models's max seq len (32768), "
        "(2.00 GB KV cache is needed, which is larger than the available KV cache memory "
        "(0.78 GB). Try increasing `gpu_memory_utilization` or decreasing `max_model_len` "
        "when initializing the engine.",
        "ValueError: No available memory for the cache blocks. Try increasing "
        "`gpu_memory_utilization` when initializing the engine.",
        # supervisord, which runs the engine in Vast's images, when the program dies.
        "2025-06-02 10:14:07,512 INFO exited: vllm (exit status 1; not expected)",
    ],
    ServerKind.SGLANG: [
        "[2025-03-29 18:56:25 TP0] Scheduler hit an exception: Traceback (most recent call last):",
        "[2026-02-27 15:27:13] Received sigquit from a child process. "
        "It usually means the child failed.",
        "RuntimeError: Not enough memory. Please try to increase --mem-fraction-static.",
        "Initialization failed. warmup error: Server disconnected",
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.53 GiB.",
        "2025-06-02 10:14:07,512 INFO exited: sglang (exit status 1; not expected)",
    ],
    ServerKind.LLAMACPP: [
        # Our build, given a file that is not a model, then a port already taken.
        "0.00.004.988 E llama_model_load: error loading model: llama_model_loader: "
        "failed to load model from /tmp/broken.gguf",
        "0.00.005.019 E llama_model_load_from_file_impl: failed to load model",
        "0.00.005.557 E srv  llama_server: exiting due to model loading error",
        "0.00.005.502 E srv  llama_server: exiting due to HTTP server error",
        # Other builds and GPUs.
        "main: exiting due to model loading error",
        "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 4096.00 MiB on device 0: "
        "cudaMalloc failed: out of memory",
        "/app/ggml/src/ggml.c:1606: GGML_ASSERT(view_src == NULL || data_size == 0) failed",
        "2025-06-02 10:14:07,512 INFO exited: llama (exit status 1; not expected)",
    ],
    ServerKind.TGI: [
        "Error: ShardCannotStart",
        "Error: DownloadError",
        "Error: WebserverFailed",
        "torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 224.00 MiB. GPU",
    ],
}
INFO_LINES = [
    # Hugging Face download progress as Vast's images log it (JSON, one object a line).
    '{"timestamp":"2024-09-03T02:40:11.101Z","level":"INFO","message":"Download file: '
    'model-00001-of-00004.safetensors","target":"text_generation_launcher"}',
]
NORMAL_LINES = {
    ServerKind.VLLM: [
        "(APIServer pid=460954) INFO 12-18 06:01:05 [api_server.py:1945] "
        "Starting vLLM API server 0 on http://0.0.0.0:8080",
        "(APIServer pid=460954) INFO 12-18 06:01:05 [launcher.py:46] "
        "Route: /openapi.json, Methods: GET, HEAD",
        '(APIServer pid=1194908) INFO:     172.22.0.188:49602 - "POST /v1/chat/completions '
        'HTTP/1.1" 200 OK',
    ],
    ServerKind.SGLANG: [
        "[2025-04-03 04:47:05] INFO:     Uvicorn running on http://127.0.0.1:30000 "
        "(Press CTRL+C to quit)",
        "[01:38:57] Load weight end. elapsed=0.38 s, type=EmbeddingGemmaModel, "
        "avail mem=286.63 GB, mem usage=0.63 GB.",
        "INFO:     Application startup complete.",
    ],
    ServerKind.LLAMACPP: [  # all from our build
        "0.00.005.484 I srv    load_model: loading model '/tmp/tiny512.gguf'",
        "0.00.011.147 I srv    load_model: initializing, n_slots = 4, n_ctx_slot = 512, "
        "kv_unified = 'false'",
        "0.00.013.569 I srv  llama_server: listening on http://127.0.0.1:35689",
        "0.03.984.475 W srv          stop: cancel task, id_task = 201",
        "0.05.543.083 I slot      release: id  3 | task 0 | stop processing: n_tokens = 23, "
        "truncated = 0",
    ],
    ServerKind.TGI: [
        "2024-08-11T08:32:59.35 INFO text_generation_router::server: "
        "router/src/server.rs:1618: Warming up model",
        "2024-08-11T08:35:46.57 INFO text_generation_launcher: Warmup done",
    ],
}
for _lines in NORMAL_LINES.values():
    # supervisord's other lines about the engine program are not failures.
    _lines.append("2025-06-02 10:02:51,004 INFO spawned: 'vllm' with pid 123")
    _lines.append("2025-06-02 10:02:52,006 INFO success: vllm entered RUNNING state")


@pytest.mark.parametrize("kind", list(LOADED_LINES))
def test_each_servers_load_line_marks_it_loaded(kind: ServerKind) -> None:
    for line in LOADED_LINES[kind]:
        assert classify(kind, line) is LineKind.LOADED, line


@pytest.mark.parametrize("kind", list(ERROR_LINES))
def test_each_servers_fatal_lines_are_errors(kind: ServerKind) -> None:
    for line in ERROR_LINES[kind]:
        assert classify(kind, line) is LineKind.ERROR, line


@pytest.mark.parametrize("kind", list(NORMAL_LINES))
def test_normal_lines_match_nothing(kind: ServerKind) -> None:
    for line in NORMAL_LINES[kind]:
        assert classify(kind, line) is None, line


def test_every_pattern_is_exercised_by_a_real_line() -> None:
    for kind in (ServerKind.VLLM, ServerKind.SGLANG, ServerKind.LLAMACPP, ServerKind.TGI):
        follower = LogFollower("unused.log", log_patterns(build_worker({"OPENAI_SERVER": kind})))
        lines = LOADED_LINES[kind] + ERROR_LINES[kind] + INFO_LINES
        for pattern in follower.patterns:
            assert any(pattern.match(line) for line in lines), (kind, pattern.text)


@pytest.mark.parametrize(
    ("environ", "health", "readiness"),
    [
        ({}, "/health", "log"),
        ({"OPENAI_SERVER": "sglang"}, "/health", "log"),
        ({"OPENAI_SERVER": "LlamaCpp"}, "/health", "log"),
        ({"OPENAI_SERVER": "tgi"}, "/health", "log"),
        ({"OPENAI_SERVER": "generic"}, "/v1/models", "health"),
    ],
)
def test_each_server_has_its_health_route(
    environ: Mapping[str, str], health: str, readiness: str
) -> None:
    server = build_worker(environ).model_copy(deep=True).model_server
    assert server.health_path == health
    server.log_file = "/var/log/model.log"
    assert server.readiness_source == readiness


def test_an_unknown_server_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="vllm, sglang, llamacpp, tgi, generic"):
        build_worker({"OPENAI_SERVER": "ollama"})


# --- benchmark dataset ----------------------------------------------------------------------
def test_the_shipped_dataset_is_completions_payloads() -> None:
    config = build_worker({})
    dataset = config.benchmark.dataset
    assert dataset is not None and len(dataset) >= 8
    assert config.benchmark.route == COMPLETIONS
    for payload in dataset:
        assert isinstance(payload["prompt"], str) and payload["prompt"].isascii()
        assert 0 < payload["max_tokens"] <= 128
        assert "model" not in payload
        assert payload["ignore_eos"] is True  # vLLM, the default: answers as long as asked
    lines = [line for line in BENCHMARK_FILE.read_text().splitlines() if line.strip()]
    assert len(lines) == len(dataset)


def test_the_model_name_goes_into_the_dataset_and_the_cache_key(tmp_path: Path) -> None:
    dataset = tmp_path / "mine.jsonl"
    dataset.write_text('{"prompt": "x", "max_tokens": 1}\n\n{"prompt": "y", "max_tokens": 2}\n')
    config = build_worker({"OPENAI_MODEL": "Qwen/Qwen3-8B", "OPENAI_BENCHMARK_FILE": str(dataset)})
    assert config.model_server.model_id == "Qwen/Qwen3-8B"
    assert config.benchmark.dataset == [
        {"prompt": "x", "max_tokens": 1, "model": "Qwen/Qwen3-8B"},
        {"prompt": "y", "max_tokens": 2, "model": "Qwen/Qwen3-8B"},
    ]
