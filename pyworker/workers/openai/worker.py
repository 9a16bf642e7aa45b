"""A worker for any OpenAI-compatible model server: vLLM, SGLang, llama.cpp's llama-server, TGI.

    OPENAI_SERVER=vllm MODEL_SERVER_URL=http://127.0.0.1:8000 MODEL_LOG=/var/log/model.log \
        pyworker run openai

Workload is counted in tokens: the prompt's estimated length plus the tokens the request may
generate (`max_tokens`, times `n`, per prompt). Produced work is what the answer's `usage` says
(prompt plus completion tokens), so the benchmark measures tokens really processed per second.
Readiness comes from each server's own "loaded" log line and its health route; the patterns
quote the real lines (see README.md in this folder).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import orjson

from pyworker.config import JSONObject, WorkerConfig
from pyworker.config.loader import ConfigError
from pyworker.protocol.usage import processed_tokens
from pyworker.workers.openai.engines import (
    ENGINE_BENCHMARKS,
    ServerKind,
    engine_model_server,
    server_kind,
)

# Re-exported: the route names live in routes.py.
from pyworker.workers.openai.routes import CHAT as CHAT
from pyworker.workers.openai.routes import COMPLETIONS as COMPLETIONS
from pyworker.workers.openai.routes import (
    RouteSettings,
    benchmark_config,
    benchmark_route,
    route_configs,
    served_routes,
)
from pyworker.workers.openai.uploads import UploadLimits

HERE = Path(__file__).resolve().parent
BENCHMARK_FILE = HERE / "benchmark.jsonl"

DEFAULT_MAX_TOKENS = 256
"""Assumed when a request sets no limit (OpenAI's chat API has none): a guess, not a bound."""
CHARS_PER_TOKEN = 4.0
"""English text averages about four characters a token in BPE vocabularies."""
MESSAGE_OVERHEAD_TOKENS = 4
"""Role markers and separators that a chat template adds around each message."""
MAX_CHOICES = 128
MAX_ITEMS = 100_000
"""Bounds the walk over a hostile payload (lists of prompts, messages, content parts)."""


# --- workload: what a request may cost, before it runs ------------------------------------
def estimate_text_tokens(text: str) -> float:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def estimate_prompt_tokens(prompt: object, nested: bool = False) -> float:
    """A completions `prompt`: text, token ids, or a list of prompts of either kind."""
    if isinstance(prompt, str):
        return estimate_text_tokens(prompt)
    if not isinstance(prompt, list):
        return 0.0
    if all(isinstance(item, int) for item in prompt[:MAX_ITEMS]):
        return float(min(len(prompt), MAX_ITEMS))
    if nested:
        return 0.0  # prompts are at most a list of lists; anything deeper is not one
    return sum(estimate_prompt_tokens(item, nested=True) for item in prompt[:MAX_ITEMS])


def estimate_message_tokens(messages: object) -> float:
    """Chat `messages`: the text of each message's content, plus the template's markers."""
    if not isinstance(messages, list):
        return 0.0
    total = 0.0
    for message in messages[:MAX_ITEMS]:
        if not isinstance(message, dict):
            continue
        total += MESSAGE_OVERHEAD_TOKENS + sum(
            estimate_text_tokens(text) for text in _content_texts(message.get("content"))
        )
    return total


def _content_texts(content: object) -> Iterable[str]:
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content[:MAX_ITEMS]:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                yield part["text"]


def prompt_count(payload: JSONObject) -> int:
    """How many prompts a completions request carries; each gets its own completions."""
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return min(len(prompt), MAX_ITEMS)
    return 1


def requested_tokens(payload: JSONObject, default: int = DEFAULT_MAX_TOKENS) -> float:
    """The most tokens the request may generate: its limit, times choices, times prompts."""
    limit = payload.get("max_completion_tokens")
    if limit is None:
        limit = payload.get("max_tokens")
    if isinstance(limit, bool) or not isinstance(limit, int | float) or not 0 <= limit < math.inf:
        limit = default
    choices = payload.get("n", 1)
    if isinstance(choices, bool) or not isinstance(choices, int) or choices < 1:
        choices = 1
    return float(limit) * min(choices, MAX_CHOICES) * prompt_count(payload)


def workload(payload: JSONObject, default_max_tokens: int = DEFAULT_MAX_TOKENS) -> float:
    """Tokens the request may cost: the prompt's estimate plus what it may generate."""
    prompt = estimate_prompt_tokens(payload.get("prompt"))
    prompt += estimate_message_tokens(payload.get("messages"))
    return prompt + requested_tokens(payload, default_max_tokens)


# --- produced work: what an answer says it cost ------------------------------------------
produced_tokens = processed_tokens
"""Tokens processed per the answer's `usage` (pyworker.protocol.usage)."""


# --- the config ----------------------------------------------------------------------------
def benchmark_payloads(path: Path, model: str | None) -> list[JSONObject]:
    """The shipped dataset, naming the model when the server wants one (vLLM checks it)."""
    payloads: list[JSONObject] = []
    for line in path.read_bytes().splitlines():
        if line.strip():
            item = orjson.loads(line)
            if isinstance(item, dict):
                payloads.append(item | ({"model": model} if model else {}))
    return payloads


def build_worker(
    environ: Mapping[str, str] | None = None, kind: ServerKind | None = None
) -> WorkerConfig:
    """The worker config for engine `kind`, by default the one `OPENAI_SERVER` names.

    Raises `ConfigError` (exit 2 at start-up) when `OPENAI_ROUTES`, `BENCHMARK_ROUTE` or an
    upload limit is not something it can serve.
    """
    env = os.environ if environ is None else environ
    kind = server_kind(env) if kind is None else kind
    model_server = engine_model_server(kind, env)
    model = model_server.model_id
    default_max_tokens = int(env.get("OPENAI_DEFAULT_MAX_TOKENS", DEFAULT_MAX_TOKENS))

    def route_workload(payload: JSONObject) -> float:
        return workload(payload, default_max_tokens)

    limits = UploadLimits.from_env(env)
    settings = RouteSettings(route_workload, produced_tokens, limits, model)
    routes = route_configs(served_routes(env), settings)
    dataset_file = Path(env.get("OPENAI_BENCHMARK_FILE") or BENCHMARK_FILE)
    completions = benchmark_payloads(dataset_file, model)
    prompts = [item["prompt"] for item in completions if isinstance(item.get("prompt"), str)]
    benchmarked = benchmark_route(env)
    custom = bool(env.get("OPENAI_BENCHMARK_FILE"))
    voice = env.get("BENCHMARK_SPEECH_VOICE") or None
    engine = ENGINE_BENCHMARKS[kind]
    benchmark = benchmark_config(benchmarked, completions, model, prompts, custom, voice, engine)
    return WorkerConfig(
        name=f"openai-{kind.value}",
        model_server=model_server,
        routes=routes,
        benchmark=benchmark,
        max_body_size=limits.body_bytes,
    )


try:
    worker = build_worker()  # from the environment that `pyworker run openai` runs in
except ConfigError as error:
    if __name__ != "__main__":
        raise  # the loader reports it and exits 2
    print(f"pyworker: {error}", file=sys.stderr)
    sys.exit(2)

if __name__ == "__main__":  # python -m pyworker.workers.openai.worker
    from pyworker.entry import serve

    serve(worker)
