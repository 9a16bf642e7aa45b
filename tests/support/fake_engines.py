"""Recording fake engines on loopback for the backend-name tests: what each worker sends.

One aiohttp app plays the engine behind each of Vast's backend names: vLLM/SGLang/llama.cpp
(OpenAI completions and chat with `usage`), vLLM's scoring routes (`/score`, `/v1/score`,
`/rerank`, `/v1/rerank`, in vLLM's answer shapes), and the ComfyUI API wrapper
(`POST /generate/sync`, refusing with 422 what ai-dock/comfyui-api-wrapper's `Payload` model
refuses, and answering its `Result` shape). Every request is recorded with its path.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Recorded:
    path: str
    payload: dict[str, Any]


@dataclass
class EngineRecorder:
    requests: list[Recorded] = field(default_factory=list)
    active_jobs: int = 0
    peak_jobs: int = 0
    job_seconds: float = 0.0
    """How long a wrapper job takes, so that overlapping jobs would be seen."""

    def paths(self) -> list[str]:
        return [item.path for item in self.requests]

    def payloads(self, path: str) -> list[dict[str, Any]]:
        return [item.payload for item in self.requests if item.path == path]


def _tokens(value: object) -> int:
    if isinstance(value, str):
        return math.ceil(len(value) / 4)
    if isinstance(value, list):
        return sum(_tokens(item) for item in value)
    return 1


def _missing(location: str) -> dict[str, Any]:
    return {"type": "missing", "loc": ["body", location], "msg": "Field required"}


def wrapper_errors(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """What the wrapper's pydantic `Payload`/`Input` models refuse, FastAPI-style."""
    job = payload.get("input")
    if job is None:
        return [_missing("input")]
    if not isinstance(job, dict):
        return [{"type": "model_type", "loc": ["body", "input"], "msg": "Input should be a dict"}]
    modifier, workflow = job.get("modifier"), job.get("workflow_json")
    message = ""
    if workflow and modifier:
        message = "Cannot provide both workflow_json and modifier - they are mutually exclusive"
    elif not workflow and not modifier:
        message = "Must provide either workflow_json OR modifier"
    elif job.get("modifications") and not modifier:
        message = "modifications can only be provided when modifier is specified"
    if message:
        return [{"type": "value_error", "loc": ["body", "input"], "msg": f"Value error, {message}"}]
    return []


def create_app(recorder: EngineRecorder) -> web.Application:
    async def record(request: web.Request) -> dict[str, Any]:
        payload: dict[str, Any] = await request.json()
        recorder.requests.append(Recorded(request.path, payload))
        return payload

    async def completions(request: web.Request) -> web.Response:
        payload = await record(request)
        produced = int(payload.get("max_tokens") or 16)
        prompt = _tokens(payload.get("prompt") or payload.get("messages") or "")
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": produced,
            "total_tokens": prompt + produced,
        }
        return web.json_response({"choices": [{"text": "x" * produced}], "usage": usage})

    async def score(request: web.Request) -> web.Response:
        payload = await record(request)
        seconds = payload.get("text_2") or payload.get("documents") or []
        count = len(seconds) if isinstance(seconds, list) else 1
        tokens = _tokens(payload.get("text_1")) * count + _tokens(seconds)
        return web.json_response(
            {
                "id": "score-1",
                "object": "list",
                "model": payload.get("model", "reranker"),
                "data": [{"index": i, "object": "score", "score": 0.5} for i in range(count)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
            }
        )

    async def rerank(request: web.Request) -> web.Response:
        payload = await record(request)
        documents = payload.get("documents") or []
        tokens = _tokens(payload.get("query")) * len(documents) + _tokens(documents)
        results = [
            {"index": i, "document": {"text": text}, "relevance_score": 1.0 / (i + 1)}
            for i, text in enumerate(documents)
        ]
        usage = {"total_tokens": tokens}
        return web.json_response(
            {"id": "rerank-1", "model": "reranker", "usage": usage, "results": results}
        )

    async def generate_sync(request: web.Request) -> web.Response:
        payload = await record(request)
        errors = wrapper_errors(payload)
        if errors:
            return web.json_response({"detail": errors}, status=422)
        recorder.active_jobs += 1
        recorder.peak_jobs = max(recorder.peak_jobs, recorder.active_jobs)
        try:
            await asyncio.sleep(recorder.job_seconds)
        finally:
            recorder.active_jobs -= 1
        job = payload["input"]
        request_id = job.get("request_id") or f"job-{len(recorder.requests)}"
        return web.json_response(
            {
                "id": request_id,
                "status": "completed",
                "message": "Request completed successfully",
                "output": [
                    {
                        "filename": f"{request_id}_00001_.png",
                        "local_path": f"/opt/ComfyUI/output/{request_id}_00001_.png",
                        "url": "",
                    }
                ],
                "timings": {"total_ms": 1},
            }
        )

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    for path in ("/v1/completions", "/v1/chat/completions"):
        app.router.add_post(path, completions)
    for path in ("/score", "/v1/score"):
        app.router.add_post(path, score)
    for path in ("/rerank", "/v1/rerank"):
        app.router.add_post(path, rerank)
    app.router.add_post("/generate/sync", generate_sync)
    app.router.add_get("/health", health)
    return app
