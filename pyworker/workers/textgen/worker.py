"""textgen: a text generator loaded in the worker's own process, with no model server.

The model (pyworker.workers.textgen.model, a character n-gram model trained at load time on
text shipped beside it) is loaded by the worker's lifecycle, and each route is a Python
function: `/generate` answers the whole text, `/generate_stream` streams it as JSON lines.
It is the shape of any in-process worker (a torch or diffusers model, say: see
docs/in-process.md), small enough to run anywhere:

    pyworker run textgen        # or: python -m workers.textgen.worker
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

from pyworker.config import BenchmarkConfig, JSONObject, RouteConfig, WorkerConfig
from pyworker.protocol.usage import completion_tokens
from pyworker.workers.textgen.model import CharModel

DEFAULT_MAX_TOKENS = 64
MAX_TOKENS = 2048
MAX_PROMPT = 4096

loaded: dict[str, CharModel] = {}
"""The model while the worker holds it: set by `model()` on enter, emptied on exit."""


@contextlib.asynccontextmanager
async def model() -> AsyncIterator[None]:
    """Load the model (off the event loop: training is CPU work), free it at the end."""
    loaded["model"] = await asyncio.to_thread(CharModel.load)
    try:
        yield
    finally:
        loaded.clear()


def read_request(payload: JSONObject) -> tuple[str, int, float, int | None]:
    """The prompt, max_tokens, temperature and seed; ValueError (422) naming a bad field."""
    prompt = payload.get("prompt", "")
    if not isinstance(prompt, str) or len(prompt) > MAX_PROMPT:
        raise ValueError(f"prompt must be a string of at most {MAX_PROMPT} characters")
    tokens = payload.get("max_tokens", DEFAULT_MAX_TOKENS)
    if isinstance(tokens, bool) or not isinstance(tokens, int) or not 0 < tokens <= MAX_TOKENS:
        raise ValueError(f"max_tokens must be an integer from 1 to {MAX_TOKENS}")
    temperature = payload.get("temperature", 0.8)
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise ValueError("temperature must be a number")
    if not 0 <= temperature <= 5:
        raise ValueError("temperature must be from 0 to 5")
    seed = payload.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError("seed must be an integer")
    return prompt, tokens, float(temperature), seed


def _characters(payload: JSONObject) -> tuple[str, Iterator[str]]:
    prompt, tokens, temperature, seed = read_request(payload)
    return prompt, loaded["model"].generate(prompt, tokens, temperature, seed)


def _usage(prompt: str, produced: int) -> dict[str, int]:
    return {
        "prompt_tokens": len(prompt),
        "completion_tokens": produced,
        "total_tokens": len(prompt) + produced,
    }


def generate(payload: JSONObject) -> JSONObject:
    """The whole text. A sync function: pyworker runs it in its thread pool."""
    prompt, characters = _characters(payload)
    text = "".join(characters)
    return {"text": text, "usage": _usage(prompt, len(text))}


def generate_stream(payload: JSONObject) -> Iterator[dict[str, Any]]:
    """The text as JSON lines, a word at a time, then its usage. Each step runs in the pool."""
    prompt, characters = _characters(payload)
    produced = 0
    word = ""
    for character in characters:
        produced += 1
        word += character
        if character == " ":
            yield {"text": word}
            word = ""
    if word:
        yield {"text": word}
    yield {"usage": _usage(prompt, produced)}


def text_route(path: str, function: Any) -> RouteConfig:
    return RouteConfig(
        path=path,
        function=function,
        workload="max_tokens",
        default_workload=DEFAULT_MAX_TOKENS,
        max_workload=MAX_TOKENS,
        max_queue_time=30.0,
        produced_work=completion_tokens,
    )


PROMPTS = ["The keeper", "The sea was", "In the village", "A machine", "When the storm"]

worker = WorkerConfig(
    name="textgen",
    lifecycle=model,
    routes=[text_route("/generate", generate), text_route("/generate_stream", generate_stream)],
    benchmark=BenchmarkConfig(
        route="/generate",
        dataset=[{"prompt": prompt, "max_tokens": 256, "seed": 1} for prompt in PROMPTS],
        rounds=3,
        concurrency=4,
    ),
    function_threads=4,
)

if __name__ == "__main__":  # python -m pyworker.workers.textgen.worker
    from pyworker.entry import serve

    serve(worker)
