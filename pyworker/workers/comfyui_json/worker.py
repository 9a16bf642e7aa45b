"""`BACKEND=comfyui-json`: ComfyUI behind the ComfyUI API wrapper (ai-dock/comfyui-api-wrapper).

The wrapper takes a whole job in one call, `POST /generate/sync`, and answers when its outputs
are written: `{"input": {"modifier": "Text2Image", "modifications": {...}}}` (a workflow the
wrapper knows, with parameters) or `{"input": {"workflow_json": {...}}}` (any API-format
workflow), plus optional `request_id`, `s3` and `webhook`. The payload goes to the wrapper
unchanged; only a payload without an `input` object is refused here (422), as Vast's reference
worker refuses it, so the wrapper's own validation answers everything else.

ComfyUI runs one job at a time: the route is FIFO, and every request weighs 100, as in the
reference, so `max_perf` reads as hundredths of a job per second. Readiness is the wrapper's
`BACKENDS_READY` log line (written once every ComfyUI backend answers), then its `/health`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import orjson

from pyworker.config import BenchmarkConfig, JSONObject, PatternConfig, RouteConfig, WorkerConfig
from pyworker.workers.engine_profile import ServerProfile

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
ROUTE = "/generate/sync"
WRAPPER_PORT = 18288
"""Where Vast's ComfyUI template runs the API wrapper (ComfyUI itself is on 18188)."""
WRAPPER_LOG = "/var/log/portal/api-wrapper.log"
REQUEST_WORKLOAD = 100.0
"""Each request's workload, as in the reference: one job is 100 units."""
MAX_QUEUE_TIME = 10.0
BENCHMARK_ROUNDS = 3
BENCHMARK_JOBS = 64
"""Distinct jobs the ramp cycles through: more than a FIFO worker runs in its time budget."""
MAX_WORKFLOW_BYTES = 16 * 1024 * 1024
"""A benchmark workflow file larger than this is not read."""

FORK_WORKFLOW = HERE.parents[2] / "workers" / "comfyui-json" / "misc" / "benchmark.json"
"""Where a fork commits its benchmark workflow (the reference's `misc/benchmark.json`): in the
repository's root `workers/` folder, next to the entry point Vast's start script runs."""
IMAGE_WORKFLOW = Path("/opt/comfyui-api-wrapper/workflows/pyworker_benchmark.json")
"""The link Vast's ComfyUI image keeps to the first provisioned workflow."""
PROMPTS_FILE = HERE / "prompts.json"
FALLBACK_PROMPT = "a still life of fruit on a wooden table, soft window light"

PROFILE = ServerProfile(
    port=WRAPPER_PORT,
    health_path="/health",
    log_file=WRAPPER_LOG,
    model_variables=("COMFY_MODEL",),
    # `\b` keeps `BACKENDS_READY_TIMEOUT` (an error) from reading as the ready line.
    load_patterns=[PatternConfig(text=r"\bBACKENDS_READY\b", regex=True)],
    error_patterns=[
        "BACKENDS_READY_TIMEOUT",  # the backends never answered within the wrapper's deadline
        "BACKEND_UNRECOVERABLE",  # a CUDA fault latched on a backend
        "Application startup failed",  # uvicorn's lifespan start-up failed
    ],
)


def check_payload(payload: JSONObject) -> JSONObject:
    """Refuse (422) what the reference refuses: a payload without an `input` object."""
    job = payload.get("input")
    if not isinstance(job, dict):
        raise ValueError("`input` must be an object: {modifier, modifications} or {workflow_json}")
    if "workflow_json" in job and not isinstance(job["workflow_json"], dict):
        raise ValueError("`input.workflow_json` must be an API-format workflow object")
    if "modifier" in job and not isinstance(job["modifier"], str):
        raise ValueError("`input.modifier` must be a string")
    return payload


# --- the benchmark ------------------------------------------------------------------------
def read_workflow(path: Path) -> JSONObject | None:
    """A workflow file's object, or None (missing, unreadable, too big, not an object)."""
    try:
        if not path.is_file() or path.stat().st_size > MAX_WORKFLOW_BYTES:
            return None
        document = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as error:
        logger.warning("benchmark workflow %s not usable: %s", path, error)
        return None
    return document if isinstance(document, dict) else None


def workflow_candidates(environ: Mapping[str, str]) -> list[Path]:
    """In the reference's order: the fork's file, `BENCHMARK_JSON_PATH`, the image's link."""
    candidates = [FORK_WORKFLOW]
    configured = environ.get("BENCHMARK_JSON_PATH", "").strip()
    if configured:
        candidates.append(Path(configured))
    candidates.append(IMAGE_WORKFLOW)
    return candidates


def benchmark_workflow(
    candidates: Sequence[Path], read: Callable[[Path], JSONObject | None] = read_workflow
) -> tuple[Path, JSONObject] | None:
    for path in candidates:
        workflow = read(path)
        if workflow is not None:
            return path, workflow
    return None


def _positive_int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) == 0:
        raise ValueError(f"{name}={raw!r}: expected a positive whole number")
    return int(raw)


def _prompts() -> list[str]:
    try:
        document = orjson.loads(PROMPTS_FILE.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return [FALLBACK_PROMPT]
    items = document if isinstance(document, list) else []
    prompts = [item.strip() for item in items if isinstance(item, str) and item.strip()]
    return prompts or [FALLBACK_PROMPT]


def benchmark_payloads(
    environ: Mapping[str, str], count: int, candidates: Sequence[Path] | None = None
) -> list[JSONObject]:
    """`count` jobs: the custom workflow when one is found, else Text2Image of SD 1.5.

    Seeds and prompts vary by index, so no two jobs are the same (ComfyUI would answer a
    repeated workflow from its cache) while the dataset, and so the benchmark cache key, stays
    the same from one start to the next. `__RANDOM_INT__` in a custom workflow is replaced by
    the wrapper itself.
    """
    found = benchmark_workflow(workflow_candidates(environ) if candidates is None else candidates)
    if found is not None:
        path, workflow = found
        logger.info("benchmark workflow from %s", path)
        return [
            {"input": {"request_id": f"benchmark-{index}", "workflow_json": workflow}}
            for index in range(count)
        ]
    width = _positive_int(environ, "BENCHMARK_TEST_WIDTH", 512)
    height = _positive_int(environ, "BENCHMARK_TEST_HEIGHT", 512)
    steps = _positive_int(environ, "BENCHMARK_TEST_STEPS", 20)
    prompts = _prompts()
    return [
        {
            "input": {
                "request_id": f"benchmark-{index}",
                "modifier": "Text2Image",
                "modifications": {
                    "prompt": prompts[index % len(prompts)],
                    "width": width,
                    "height": height,
                    "steps": steps,
                    "seed": 1_000_003 * (index + 1),
                },
            }
        }
        for index in range(count)
    ]


def build_worker(environ: Mapping[str, str] | None = None) -> WorkerConfig:
    env = os.environ if environ is None else environ
    return WorkerConfig(
        name="comfyui-json",
        model_server=PROFILE.model_server(env),
        routes=[
            RouteConfig(
                path=ROUTE,
                fifo=True,
                max_queue_time=MAX_QUEUE_TIME,
                workload=REQUEST_WORKLOAD,
                default_workload=REQUEST_WORKLOAD,
                request_hook=check_payload,
                read_timeout=3600.0,
            )
        ],
        benchmark=BenchmarkConfig(
            route=ROUTE,
            dataset=benchmark_payloads(env, BENCHMARK_JOBS),
            rounds=BENCHMARK_ROUNDS,
            concurrency=1,
            timeout=3600.0,
        ),
    )


worker = build_worker()

if __name__ == "__main__":  # python -m pyworker.workers.comfyui_json.worker
    from pyworker.entry import serve

    serve(worker)
