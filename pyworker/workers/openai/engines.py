"""The engines behind the OpenAI-compatible workers and what each one's defaults are.

`vllm`, `sglang`, `llama` and `openai` (an alias of `vllm`, or of the engine `OPENAI_SERVER`
names) share one worker definition (worker.py here) and differ only in a profile:
the port, log file and model variable of Vast's template for that engine, its health route,
and the log lines that say it loaded or failed. The log patterns quote the real lines (see
README.md in this folder); every default can be overridden through the environment
(`MODEL_SERVER_PORT`, `MODEL_SERVER_URL`, `MODEL_LOG`, `MODEL_HEALTH_ENDPOINT`, `MODEL_NAME`,
`MODEL_LOAD_LOG_MSG`, `MODEL_ERROR_LOG_MSGS`, `MODEL_INFO_LOG_MSGS`).
"""

from __future__ import annotations

from collections.abc import Mapping

from pyworker.backports import StrEnum
from pyworker.config import LimitProbe, ModelServerConfig, Pattern, PatternConfig
from pyworker.config.template_env import served_model
from pyworker.workers.engine_profile import ServerProfile
from pyworker.workers.openai.benchmarks import EngineBenchmark

VAST_ENGINE_PORT = 18000
"""Where Vast's vLLM, SGLang and llama.cpp templates start the engine."""
VAST_TGI_PORT = 5001
"""Where Vast's TGI template starts text-generation-launcher."""
DOWNLOAD_LINE = '"message":"Download'
"""Echoed as information: the Hugging Face download progress Vast's images log as JSON."""


class ServerKind(StrEnum):
    VLLM = "vllm"
    SGLANG = "sglang"
    LLAMACPP = "llamacpp"
    TGI = "tgi"
    GENERIC = "generic"


def _regex(text: str) -> PatternConfig:
    return PatternConfig(text=text, regex=True)


def _supervisor_exit(program: str) -> str:
    """supervisord's line when the image's engine program dies: `INFO exited: vllm (exit ...`."""
    return f"INFO exited: {program} "


def _vast_engine(
    program: str, model_variable: str, loaded: Pattern, errors: list[Pattern]
) -> ServerProfile:
    """An engine of Vast's vLLM, SGLang or llama.cpp template: supervisord's `program` on port
    18000, logging to `/var/log/portal/<program>.log`, dead when supervisord says it exited."""
    return ServerProfile(
        port=VAST_ENGINE_PORT,
        health_path="/health",
        log_file=f"/var/log/portal/{program}.log",
        model_variables=(model_variable,),
        load_patterns=[loaded],
        error_patterns=[*errors, _supervisor_exit(program)],
        info_patterns=[DOWNLOAD_LINE],
    )


PROFILES: dict[ServerKind, ServerProfile] = {
    # vLLM: uvicorn's line comes after "Starting vLLM API server ... on http://..." and the
    # route list, once the engine is up and the app serves.
    ServerKind.VLLM: _vast_engine(
        "vllm",
        "VLLM_MODEL",
        "Application startup complete.",
        [
            "Engine core initialization failed",
            "EngineDeadError",
            "CUDA out of memory",
            "No available memory for the cache blocks",
            _regex(r"(?i)larger than the available KV cache memory"),
        ],
    ),
    # SGLang prints this after its warm-up request, later than uvicorn's own startup lines.
    ServerKind.SGLANG: _vast_engine(
        "sglang",
        "SGLANG_MODEL",
        "The server is fired up and ready to roll!",
        [
            "Scheduler hit an exception",
            "Received sigquit from a child process",
            "Not enough memory. Please try to increase --mem-fraction-static",
            "Initialization failed. warmup error",
            "CUDA out of memory",
        ],
    ),
    # llama-server: "srv  llama_server: model loaded" (older builds: "main: model loaded");
    # /health answers 503 while the model loads, then 200.
    ServerKind.LLAMACPP: _vast_engine(
        "llama",
        "LLAMA_MODEL",
        _regex(r"(?:\bsrv\s+\S+|\bmain): model loaded\s*$"),
        [
            "exiting due to model loading error",
            "error loading model",
            "failed to load model",
            "cudaMalloc failed: out of memory",
            "exiting due to HTTP server error",
            "GGML_ASSERT",
        ],
    ),
    # TGI's router, in its text and its JSON log formats (its messages API, /v1/...).
    ServerKind.TGI: ServerProfile(
        port=VAST_TGI_PORT,
        health_path="/health",
        model_variables=("MODEL_ID",),
        load_patterns=[
            _regex(r"text_generation_router(?:::server)?: \S+: Connected\s*$"),
            _regex(r'"message":"Connected","target":"text_generation_router'),
        ],
        error_patterns=[
            "Error: ShardCannotStart",
            "Error: DownloadError",
            "Error: WebserverFailed",
            "CUDA out of memory",
        ],
        info_patterns=[DOWNLOAD_LINE],
    ),
    # Anything else (llama-cpp-python, LM Studio, ...): no log patterns, ready when the
    # model list answers, which every OpenAI-compatible server has.
    ServerKind.GENERIC: ServerProfile(port=VAST_ENGINE_PORT, health_path="/v1/models"),
}

BACKEND_KINDS: dict[str, ServerKind] = {
    "vllm": ServerKind.VLLM,
    "sglang": ServerKind.SGLANG,
    "llama": ServerKind.LLAMACPP,
}
"""The `BACKEND` names of Vast's start path and the engine each one is."""


def server_kind(environ: Mapping[str, str]) -> ServerKind:
    """The engine `OPENAI_SERVER` names, vLLM by default (`BACKEND=openai` is vLLM's alias)."""
    name = environ.get("OPENAI_SERVER", ServerKind.VLLM.value).strip().lower()
    try:
        return ServerKind(name)
    except ValueError:
        choices = ", ".join(kind.value for kind in ServerKind)
        raise ValueError(f"OPENAI_SERVER={name!r}: expected one of {choices}") from None


def engine_model(kind: ServerKind, environ: Mapping[str, str]) -> str | None:
    """The served model: `OPENAI_MODEL`, else `MODEL_NAME`, else the engine's own variable."""
    explicit = environ.get("OPENAI_MODEL", "").strip()
    return explicit or served_model(environ, PROFILES[kind].model_variables)


ENGINE_BENCHMARKS: dict[ServerKind, EngineBenchmark] = {
    # vLLM, SGLang and llama-server accept `ignore_eos`: benchmark answers are as long as asked.
    # vLLM does not say how many it schedules at once (`--max-num-seqs`) over HTTP.
    ServerKind.VLLM: EngineBenchmark({"ignore_eos": True}),
    ServerKind.SGLANG: EngineBenchmark(
        {"ignore_eos": True}, LimitProbe(path="/get_server_info", field="max_running_requests")
    ),
    # llama-server would answer the benchmark's few cycled prompts from its slots' caches
    # (`cache_prompt`) while `usage` still counts every prompt token: a figure that real,
    # distinct prompts never reach. Each benchmark prompt is computed in full. Its HTTP threads
    # are its slots plus 2, each held by an open connection: the worker keeps to one more
    # connection than the slots, and its health checks to the last thread.
    ServerKind.LLAMACPP: EngineBenchmark(
        {"ignore_eos": True, "cache_prompt": False},
        LimitProbe(path="/props", field="total_slots", spare_connections=1),
    ),
    ServerKind.TGI: EngineBenchmark(
        limit_probe=LimitProbe(path="/info", field="max_concurrent_requests")
    ),
    ServerKind.GENERIC: EngineBenchmark(),
}
"""What each engine adds to the benchmark (pyworker.workers.openai.routes.EngineBenchmark)."""


def engine_model_server(kind: ServerKind, environ: Mapping[str, str]) -> ModelServerConfig:
    """The model server part of the config: the profile, with the template's variables."""
    return PROFILES[kind].model_server(environ, engine_model(kind, environ))
