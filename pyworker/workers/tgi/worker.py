"""Worker for Hugging Face text-generation-inference (TGI), on its native API.

`/generate` answers `{"generated_text", "details"}` in one body; `/generate_stream` answers
server-sent events, one per token, the last with `generated_text` and `details`. Both pass
through unchanged. A request's workload is in tokens: `max_new_tokens` plus the prompt
estimated at four characters a token; the benchmark counts what TGI says it processed
(`details.generated_tokens` plus the prompt tokens it reports in `details.prefill`).

Readiness comes from the launcher's log (MODEL_LOG): the router's "Connected" line, which it
writes once the shards are warmed up, in text or `--json-output` form. The README cites the
source of every line matched here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pyworker.config import (
    BenchmarkConfig,
    JSONObject,
    LimitProbe,
    PatternConfig,
    RouteConfig,
    WorkerConfig,
)
from pyworker.workers.engine_profile import ServerProfile

HERE = Path(__file__).resolve().parent
BENCHMARK_FILE = HERE / "benchmark.jsonl"
ROUTES = ("/generate", "/generate_stream")
"""TGI's native API; the benchmark sends its dataset to the first, in one body."""
CHARS_PER_TOKEN = 4
DEFAULT_MAX_NEW_TOKENS = 100
"""TGI's own default when `parameters.max_new_tokens` is missing or null."""

# The router's ready line, e.g. `... INFO text_generation_router: router/src/main.rs:247:
# Connected` or `{"message":"Connected","target":"text_generation_router",...}` (JSON logs),
# also with the ANSI colour codes TGI writes when its output is a terminal.
CONNECTED = r'^(?=.*text_generation_router).*(\sConnected(\x1b\[0m)?\s*$|"message":"Connected")'
# The launcher's exit line (`Error: ShardCannotStart`): the Debug name of its LauncherError.
LAUNCHER_EXIT = (
    r"\bError: (ArgumentValidation|NotEnoughCUDADevices|DownloadError|ShardCannotStart"
    r"|ShardDisconnected|ShardFailed|WebserverFailed|WebserverCannotStart)\b"
)


def workload(payload: JSONObject) -> float:
    """Tokens this request may cost: the new tokens it asks for plus its prompt's."""
    parameters = payload.get("parameters")
    asked = parameters.get("max_new_tokens") if isinstance(parameters, dict) else None
    if isinstance(asked, bool) or not isinstance(asked, int) or asked < 0:
        asked = DEFAULT_MAX_NEW_TOKENS
    return float(asked + prompt_tokens(payload.get("inputs")))


def prompt_tokens(inputs: object) -> int:
    return math.ceil(len(inputs) / CHARS_PER_TOKEN) if isinstance(inputs, str) else 0


def produced_work(answer: JSONObject) -> float | None:
    """Tokens TGI processed, from `details` (None when it sent none: `details` was false).

    `details.prefill` lists the prompt tokens only when the request set
    `decoder_input_details` (the benchmark dataset does); it is empty otherwise.
    """
    details = answer.get("details")
    if not isinstance(details, dict):
        return None
    generated = details.get("generated_tokens")
    if isinstance(generated, bool) or not isinstance(generated, int) or generated < 0:
        return None
    prefill = details.get("prefill")
    return float(generated + (len(prefill) if isinstance(prefill, list) else 0))


def check_payload(payload: JSONObject) -> JSONObject:
    """Refuse (422) what TGI would refuse anyway, before it waits in the queue."""
    inputs = payload.get("inputs")
    if not isinstance(inputs, str) or not inputs:
        raise ValueError("`inputs` must be a non-empty string")
    if "parameters" in payload and not isinstance(payload["parameters"], dict | None):
        raise ValueError("`parameters` must be an object")
    return payload


def _route(path: str) -> RouteConfig:
    return RouteConfig(
        path=path,
        workload=workload,
        default_workload=float(DEFAULT_MAX_NEW_TOKENS),
        request_hook=check_payload,
        produced_work=produced_work,
    )


def _patterns(*texts: str, regex: bool = False, fatal: bool = True) -> list[Any]:
    return [PatternConfig(text=text, regex=regex, fatal=fatal) for text in texts]


VAST_TGI_PORT = 5001
"""Where Vast's TGI template starts text-generation-launcher."""
PROFILE = ServerProfile(
    port=VAST_TGI_PORT,
    health_path="/health",
    model_variables=("MODEL_ID",),
    load_patterns=_patterns(CONNECTED, regex=True),
    error_patterns=[
        *_patterns(LAUNCHER_EXIT, r"Shard \d+ (failed to start|crashed)", regex=True),
        *_patterns("CUDA out of memory", "Error when initializing model", "Webserver Crashed"),
        # The router failing one request: counted; /health tells whether the shards died.
        *_patterns("Request failed during generation", fatal=False),
    ],
    info_patterns=[
        "Starting download process",
        "Download file:",
        "Waiting for shard to be ready",
        "Shard ready in",
        "Warming up model",
    ],
)


def build_worker(environ: Mapping[str, str] | None = None) -> WorkerConfig:
    """The config, with what Vast's TGI template sets: `MODEL_ID` (or `MODEL_NAME`), the
    port (`MODEL_SERVER_PORT`, 5001 as in the template) and the log grammar variables."""
    env = os.environ if environ is None else environ
    return WorkerConfig(
        name="tgi",
        model_server=PROFILE.model_server(env),
        routes=[_route(path) for path in ROUTES],
        benchmark=BenchmarkConfig(
            route=ROUTES[0],
            dataset_file=str(BENCHMARK_FILE),
            # TGI answers 429 beyond this: the ramp stays within it.
            limit_probe=LimitProbe(path="/info", field="max_concurrent_requests"),
        ),
    )


worker = build_worker()

if __name__ == "__main__":  # python -m pyworker.workers.tgi.worker
    from pyworker.entry import serve

    serve(worker)
