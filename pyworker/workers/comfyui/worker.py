"""Worker for ComfyUI, on its workflow API.

ComfyUI has no call that takes a workflow and answers its images: `POST /prompt` queues the
workflow and answers a `prompt_id`, the result appears in `GET /history/{prompt_id}` once it
has run, and the files are served by `GET /view`. So the `/workflow` route runs a handler
(`RouteConfig.handler`) that submits, polls the history with a backoff and a deadline, and
answers the images inline (base64) or as `/view` paths. A request cut short (client gone,
timeout) is deleted from ComfyUI's queue and interrupted, so it does not hold the GPU.

ComfyUI runs one prompt at a time: the route is FIFO. A request's workload is the sampling
work in its workflow, in 512x512 steps: the sum over sampler nodes of steps x latent pixels
(batch included) / (512 x 512).

Readiness comes from ComfyUI's log (MODEL_LOG): "To see the GUI go to: ..." is written once
the server listens, after the custom nodes are loaded. The README cites every line matched.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import orjson

from pyworker import backports
from pyworker.config import (
    BenchmarkConfig,
    HandlerResult,
    JSONObject,
    ModelServerConfig,
    PatternConfig,
    RouteConfig,
    WorkerConfig,
)

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
REFERENCE_PIXELS = 512 * 512
MAX_HOPS = 16
"""Links followed from a sampler back to the node that sets its latent size."""
MAX_WAIT = 3600.0
"""The longest a workflow is waited for, whatever the route's `read_timeout`."""
POLL_FIRST, POLL_MAX = 0.02, 0.1
"""History polls: a lookup in ComfyUI, cheap; the FIFO route idles until one sees the end."""
CALL_TIMEOUT = aiohttp.ClientTimeout(total=30.0)
FORGET_TIMEOUT = 5.0
MAX_INLINE_BYTES = 64 * 1024 * 1024
"""Images beyond this total are answered as `/view` paths only (`base64` null)."""
JSON_HEADERS = {"Content-Type": "application/json"}
OUTPUT_FORMATS = ("base64", "paths")
FAILURE_FIELDS = ("node_id", "node_type", "exception_type", "exception_message")


# --- the payload and its workload -------------------------------------------------------------
def workflow_of(payload: JSONObject) -> dict[str, Any] | None:
    """The API-format workflow: `payload["workflow"]`, or `payload["prompt"]` (ComfyUI's name)."""
    for key in ("workflow", "prompt"):
        value = payload.get(key)
        if isinstance(value, dict):
            return value
    return None


def check_payload(payload: JSONObject) -> JSONObject:
    """Refuse (422) a payload that is not a workflow, before it waits in the FIFO queue."""
    workflow = workflow_of(payload)
    if not workflow:
        raise ValueError("`workflow` (or `prompt`) must be a ComfyUI API-format workflow object")
    for node_id, node in workflow.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            raise ValueError(f"node {node_id!r} needs a `class_type`")
        if not isinstance(node.get("inputs", {}), dict):
            raise ValueError(f"node {node_id!r}: `inputs` must be an object")
    if payload.get("output", "base64") not in OUTPUT_FORMATS:
        raise ValueError(f"`output` must be one of {', '.join(OUTPUT_FORMATS)}")
    return payload


def workload(payload: JSONObject) -> float:
    """Sampling work in 512x512 steps; 1 for a workflow that samples nothing (an upscale)."""
    workflow = workflow_of(payload) or {}
    total = 0.0
    for node in workflow.values():
        inputs = _inputs(node)
        if "latent_image" in inputs:
            steps = _sampler_steps(workflow, inputs)
            total += steps * _latent_pixels(workflow, inputs["latent_image"]) / REFERENCE_PIXELS
    return total if total > 0 else 1.0


def _inputs(node: object) -> dict[str, Any]:
    inputs = node.get("inputs") if isinstance(node, dict) else None
    return inputs if isinstance(inputs, dict) else {}


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return None
    return float(value)


def _linked(workflow: dict[str, Any], link: object) -> dict[str, Any] | None:
    """The node an input is wired to: links are `[node_id, output_index]`."""
    if isinstance(link, list) and len(link) == 2 and isinstance(link[0], str | int):
        node = workflow.get(str(link[0]))
        return node if isinstance(node, dict) else None
    return None


def _sampler_steps(workflow: dict[str, Any], inputs: dict[str, Any]) -> float:
    """Model evaluations of one sampler: KSampler's `steps`, KSamplerAdvanced's step window,
    or the `steps` of the scheduler node wired to a custom sampler's `sigmas`."""
    steps = _number(inputs.get("steps"))
    if steps is None:
        steps = _number(_inputs(_linked(workflow, inputs.get("sigmas"))).get("steps"))
    if steps is None:
        return 0.0
    start = _number(inputs.get("start_at_step"))
    end = _number(inputs.get("end_at_step"))
    if start is not None and end is not None:
        return max(0.0, min(end, steps) - start)
    return steps


def _latent_pixels(workflow: dict[str, Any], link: object) -> float:
    """Pixels sampled: width x height x batch of the latent's source, scaled by any
    `scale_by` upscale on the way; 512x512 when the size comes from an image (img2img)."""
    factor = 1.0
    for _ in range(MAX_HOPS):
        inputs = _inputs(_linked(workflow, link))
        width, height = _number(inputs.get("width")), _number(inputs.get("height"))
        if width and height:
            batch = _number(inputs.get("batch_size")) or 1.0
            return width * height * batch * factor
        scale = _number(inputs.get("scale_by"))
        if scale:
            factor *= scale * scale
        link = inputs.get("samples", inputs.get("latent_image"))  # an upscale's or a sampler's
        if link is None:
            break
    return REFERENCE_PIXELS * factor


# --- the handler: submit, wait, fetch ---------------------------------------------------------
async def run_workflow(
    session: aiohttp.ClientSession, base_url: str, payload: JSONObject
) -> HandlerResult:
    """Run one workflow on ComfyUI and answer its images (see the module docstring)."""
    workflow = workflow_of(payload)
    if not workflow:
        return _json(422, {"error": "payload has no `workflow`"})
    started = time.monotonic()
    submitted = {"prompt": workflow, "client_id": uuid.uuid4().hex}
    async with session.post(
        base_url + "/prompt",
        data=orjson.dumps(submitted),
        headers=JSON_HEADERS,
        timeout=CALL_TIMEOUT,
    ) as response:
        body = await response.read()
        if response.status != 200:  # ComfyUI's own validation error, passed through
            return HandlerResult(response.status, body, response.content_type)
    prompt_id = _field(body, "prompt_id")
    if not isinstance(prompt_id, str):
        return _json(502, {"error": "ComfyUI answered /prompt without a prompt_id"})
    try:
        async with backports.timeout(MAX_WAIT):
            entry = await _wait_for(session, base_url, prompt_id)
    except (asyncio.CancelledError, asyncio.TimeoutError):
        await asyncio.shield(_forget(session, base_url, prompt_id))
        raise
    failure = _failure(entry)
    if failure is not None:
        return _json(500, {"error": "workflow failed", "prompt_id": prompt_id, **failure})
    images = list(_output_files(entry.get("outputs")))
    if payload.get("output", "base64") == "base64":
        await _inline(session, base_url, images)
    seconds = round(time.monotonic() - started, 3)
    return _json(200, {"prompt_id": prompt_id, "images": images, "seconds": seconds})


async def _wait_for(
    session: aiohttp.ClientSession, base_url: str, prompt_id: str
) -> dict[str, Any]:
    """Poll the history until the prompt is in it: ComfyUI adds it once it has run."""
    delay = POLL_FIRST
    while True:
        async with session.get(f"{base_url}/history/{prompt_id}", timeout=CALL_TIMEOUT) as response:
            body = await response.read()
        entry = _field(body, prompt_id) if response.status == 200 else None
        if isinstance(entry, dict):
            return entry
        await asyncio.sleep(delay)
        delay = min(delay * 2, POLL_MAX)


async def _forget(session: aiohttp.ClientSession, base_url: str, prompt_id: str) -> None:
    """Drop an abandoned prompt: delete it from the queue, interrupt it if it is running."""
    timeout = aiohttp.ClientTimeout(total=FORGET_TIMEOUT)
    for path, body in (
        ("/queue", {"delete": [prompt_id]}),
        ("/interrupt", {"prompt_id": prompt_id}),
    ):
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            async with session.post(
                base_url + path, data=orjson.dumps(body), headers=JSON_HEADERS, timeout=timeout
            ) as response:
                await response.read()
    logger.info("abandoned ComfyUI prompt %s removed", prompt_id)


def _failure(entry: dict[str, Any]) -> dict[str, Any] | None:
    """What went wrong, from the history's status messages; None if it succeeded."""
    status = entry.get("status")
    if not isinstance(status, dict) or status.get("status_str") != "error":
        return None
    details: dict[str, Any] = {}
    for message in status.get("messages") or []:
        if not (isinstance(message, list) and len(message) == 2):
            continue
        event, data = message
        if event in ("execution_error", "execution_interrupted") and isinstance(data, dict):
            details = {"event": event} | {key: data[key] for key in FAILURE_FIELDS if key in data}
    return details


def _output_files(outputs: object) -> Iterator[dict[str, Any]]:
    """Every file a node output names (`images`, `gifs`, ...), with its `/view` path."""
    if not isinstance(outputs, dict):
        return
    for node_id, output in outputs.items():
        if not isinstance(output, dict):
            continue
        for kind, items in output.items():
            for item in items if isinstance(items, list) else []:
                if isinstance(item, dict) and isinstance(item.get("filename"), str):
                    query = {
                        "filename": item["filename"],
                        "subfolder": str(item.get("subfolder", "")),
                        "type": str(item.get("type", "output")),
                    }
                    yield {
                        "node": node_id,
                        "kind": kind,
                        **query,
                        "view": "/view?" + urlencode(query),
                    }


async def _inline(
    session: aiohttp.ClientSession, base_url: str, files: list[dict[str, Any]]
) -> None:
    """Add each file's bytes as base64, within MAX_INLINE_BYTES in all."""
    budget = MAX_INLINE_BYTES
    for item in files:
        item["base64"] = None
        async with session.get(base_url + item["view"], timeout=CALL_TIMEOUT) as response:
            size = response.content_length
            if response.status != 200 or size is None or size > budget:
                continue
            data = await response.read()
            item["content_type"] = response.content_type
        budget -= len(data)
        item["base64"] = base64.b64encode(data).decode("ascii")


def _field(body: bytes, key: str) -> object:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return document.get(key) if isinstance(document, dict) else None


def _json(status: int, document: dict[str, Any]) -> HandlerResult:
    return HandlerResult(status, orjson.dumps(document))


# --- the config -------------------------------------------------------------------------------
class ReseededWorkflows:
    """The benchmark's payloads: the shipped workflows in turn, each index with seeds of its
    own, since ComfyUI answers a repeated workflow from its cache (the ramp sends many)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._payloads: list[JSONObject] | None = None

    def __call__(self, index: int) -> JSONObject:
        if self._payloads is None:
            self._payloads = orjson.loads(self.path.read_bytes())
        payload = self._payloads[index % len(self._payloads)]
        workflow = orjson.loads(orjson.dumps(payload["workflow"]))  # a deep copy
        for node in workflow.values():
            inputs = node.get("inputs", {}) if isinstance(node, dict) else {}
            for key in ("seed", "noise_seed"):
                if isinstance(inputs.get(key), int):
                    inputs[key] = (inputs[key] + SEED_STRIDE * index) % 2**32
        return payload | {"workflow": workflow}


SEED_STRIDE = 1_000_003

worker = WorkerConfig(
    name="comfyui",
    model_server=ModelServerConfig(
        base_url="http://127.0.0.1:8188",
        health_path="/system_stats",
        load_patterns=["To see the GUI go to: "],
        error_patterns=[
            # Fatal first: a line matching several patterns counts as the first.
            PatternConfig(text="MetadataIncompleteBuffer"),  # a corrupt checkpoint file
            PatternConfig(text="Torch not compiled with CUDA enabled"),
            PatternConfig(text="Found no NVIDIA driver on your system"),
            # One prompt failing (bad input, an OOM ComfyUI recovers from): counted only.
            PatternConfig(text="!!! Exception during processing", fatal=False),
            PatternConfig(text="Got an OOM, unloading all loaded models", fatal=False),
            PatternConfig(text="Failed to validate prompt for output", fatal=False),
        ],
        info_patterns=["Total VRAM", "got prompt", "Prompt executed in"],
    ),
    routes=[
        RouteConfig(
            path="/workflow",
            fifo=True,
            workload=workload,
            request_hook=check_payload,
            handler=run_workflow,
        )
    ],
    benchmark=BenchmarkConfig(
        route="/workflow",
        generator=ReseededWorkflows(HERE / "benchmark.json"),
    ),
)

if __name__ == "__main__":  # python -m pyworker.workers.comfyui.worker
    from pyworker.entry import serve

    serve(worker)
