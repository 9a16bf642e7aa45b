"""What the ready workers in workers/ read, each for the model server it runs beside."""

from __future__ import annotations

from pyworker.config.variables.row import Reader, Variable

READY_WORKER_VARIABLES: tuple[Variable, ...] = (
    # --- ready workers -------------------------------------------------------------------------
    Variable(
        "OPENAI_SERVER",
        "`vllm`",
        "`openai` worker: which server runs behind it (`vllm`, `sglang`, `llamacpp`, `tgi`, "
        "`generic`): its port, health route and log lines.",
        Reader.WORKERS,
    ),
    Variable(
        "OPENAI_MODEL",
        "unset",
        "`openai` worker: the model name, put in the benchmark payloads and the cache key.",
        Reader.WORKERS,
    ),
    Variable(
        "OPENAI_DEFAULT_MAX_TOKENS",
        "`256`",
        "`openai` worker: the workload of a request that sets no `max_tokens`.",
        Reader.WORKERS,
    ),
    Variable(
        "OPENAI_BENCHMARK_FILE",
        "the worker's own `benchmark.jsonl`",
        "`openai` worker: the benchmark payloads (JSON Lines).",
        Reader.WORKERS,
    ),
    Variable(
        "MODEL_ID",
        "unset",
        "`tgi` worker: the model's name in the benchmark cache key.",
        Reader.WORKERS,
    ),
    Variable(
        "MODEL_SERVER_PORT",
        "the engine's port in Vast's templates: `18000` (vLLM, SGLang, llama.cpp), `5001` "
        "(TGI), `18288` (ComfyUI API wrapper)",
        "Ready workers: the engine's port on 127.0.0.1 (`MODEL_SERVER_URL` wins over it).",
        Reader.WORKERS,
    ),
    Variable(
        "MODEL_NAME",
        "unset",
        "Ready workers: the served model, put in the benchmark payloads and the cache key "
        "(`OPENAI_MODEL` wins over it; else the engine's own variable: `VLLM_MODEL`, "
        "`SGLANG_MODEL`, `LLAMA_MODEL`, `MODEL_ID`, `COMFY_MODEL`).",
        Reader.WORKERS,
    ),
    Variable("VLLM_MODEL", "unset", "See `MODEL_NAME` (vllm, openai).", Reader.WORKERS),
    Variable("SGLANG_MODEL", "unset", "See `MODEL_NAME` (sglang).", Reader.WORKERS),
    Variable("LLAMA_MODEL", "unset", "See `MODEL_NAME` (llama).", Reader.WORKERS),
    Variable("COMFY_MODEL", "unset", "See `MODEL_NAME` (comfyui-json).", Reader.WORKERS),
    Variable(
        "MODEL_LOAD_LOG_MSG",
        "the worker's own load lines",
        "Ready workers: replaces the lines that say the engine loaded, one substring a line "
        "(at most 64).",
        Reader.WORKERS,
    ),
    Variable(
        "MODEL_ERROR_LOG_MSGS",
        "the worker's own error lines",
        "Ready workers: replaces the fatal log lines, one substring a line (at most 64).",
        Reader.WORKERS,
    ),
    Variable(
        "MODEL_INFO_LOG_MSGS",
        "the worker's own info lines",
        "Ready workers: replaces the log lines echoed as information, one substring a line.",
        Reader.WORKERS,
    ),
    Variable(
        "BENCHMARK_ROUTE",
        "`/v1/completions` (`openai` family), `/score` (`vllm-score`)",
        "The route the benchmark measures: set it for a model that does not serve the default "
        "(embeddings, Whisper, images, speech, rerank). It must be among the routes served.",
        Reader.WORKERS,
    ),
    Variable(
        "OPENAI_ROUTES",
        "unset: every OpenAI route",
        "`openai` family: the routes served, comma-separated; must include `BENCHMARK_ROUTE` "
        "(exit 2 otherwise).",
        Reader.WORKERS,
    ),
    Variable(
        "OPENAI_MAX_FILE_BYTES",
        "`26214400` (25 MiB)",
        "`openai` family: the largest decoded upload (`file`, each `image`, `mask`); 413 beyond.",
        Reader.WORKERS,
    ),
    Variable(
        "OPENAI_MAX_REQUEST_FILE_BYTES",
        "`67108864` (64 MiB)",
        "`openai` family: the decoded uploads of one request together; 413 beyond.",
        Reader.WORKERS,
    ),
    Variable(
        "BENCHMARK_SPEECH_VOICE",
        "the engine's default",
        "`openai` family: the voice of the `/v1/audio/speech` benchmark.",
        Reader.WORKERS,
    ),
    Variable(
        "BENCHMARK_JSON_PATH",
        "unset",
        "`comfyui-json`: a workflow request to benchmark with (after the worker's own "
        "`misc/benchmark.json`, before the wrapper's `pyworker_benchmark.json`).",
        Reader.WORKERS,
    ),
    Variable(
        "BENCHMARK_TEST_WIDTH",
        "`512`",
        "`comfyui-json`: the built-in Text2Image benchmark's image width.",
        Reader.WORKERS,
    ),
    Variable(
        "BENCHMARK_TEST_HEIGHT",
        "`512`",
        "`comfyui-json`: the built-in Text2Image benchmark's image height.",
        Reader.WORKERS,
    ),
    Variable(
        "BENCHMARK_TEST_STEPS",
        "`20`",
        "`comfyui-json`: the built-in Text2Image benchmark's sampling steps.",
        Reader.WORKERS,
    ),
)
