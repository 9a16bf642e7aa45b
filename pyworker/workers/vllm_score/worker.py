"""`BACKEND=vllm-score`: vLLM serving a reranker (a cross-encoder or a scoring model).

vLLM scores (query, document) pairs on `/score` (and `/v1/score`) and reranks documents
against a query on `/rerank` and `/v1/rerank` (Jina's and Cohere's API shape). Payloads and
answers pass through unchanged; a payload wrapped in `{"input": {...}}`, as the reference's
clients send it, is unwrapped first. Workload is in tokens: every pair the model reads, query
plus document, estimated at four characters a token; the benchmark counts the tokens vLLM
says it processed (`usage`). vLLM's defaults (port 18000, log lines, `/health`) come from
../openai/engines.py, with the same environment overrides.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import orjson

from pyworker.config import BenchmarkConfig, JSONObject, RouteConfig, WorkerConfig
from pyworker.workers.openai.engines import ServerKind, engine_model_server
from pyworker.workers.openai.worker import produced_tokens

HERE = Path(__file__).resolve().parent
BENCHMARK_FILE = HERE / "benchmark.jsonl"
SCORE_ROUTES = ("/score", "/v1/score")
RERANK_ROUTES = ("/rerank", "/v1/rerank")
DEFAULT_BENCHMARK_ROUTE = "/score"
CHARS_PER_TOKEN = 4.0
MAX_PAIRS = 100_000
"""Bounds the walk over a hostile payload."""
NON_TEXT_TOKENS = 256.0
"""An input that is not text (an image part, a token list we cannot size) counts this much."""


def unwrap_input(payload: JSONObject) -> JSONObject:
    """`{"input": {...}}` is the reference's envelope for the same payload."""
    inner = payload.get("input")
    return inner if isinstance(inner, dict) else payload


def text_tokens(value: object) -> float:
    if isinstance(value, str):
        return math.ceil(len(value) / CHARS_PER_TOKEN)
    if isinstance(value, dict) and isinstance(value.get("text"), str):
        return text_tokens(value["text"])  # a rerank document given as {"text": ...}
    return NON_TEXT_TOKENS


def _as_list(value: object) -> list[object]:
    if value is None:
        return []
    return value[:MAX_PAIRS] if isinstance(value, list) else [value]


def pairs_tokens(queries: object, documents: object) -> float:
    """One query against every document, or two lists pairwise, as vLLM pairs them."""
    firsts, seconds = _as_list(queries), _as_list(documents)
    if not firsts or not seconds:
        return 0.0
    if len(firsts) == 1:
        query = text_tokens(firsts[0])
        return sum(query + text_tokens(document) for document in seconds)
    return sum(text_tokens(a) + text_tokens(b) for a, b in zip(firsts, seconds, strict=False))


def _first(payload: JSONObject, *keys: str) -> object:
    return next((payload[key] for key in keys if payload.get(key) is not None), None)


def score_workload(payload: JSONObject) -> float:
    """vLLM's `/score` shapes: `text_1`/`text_2`, `data_1`/`data_2`, `queries` with
    `documents` or `items`."""
    payload = unwrap_input(payload)
    queries = _first(payload, "text_1", "data_1", "queries")
    documents = _first(payload, "text_2", "data_2", "documents", "items")
    return max(pairs_tokens(queries, documents), 1.0)


def rerank_workload(payload: JSONObject) -> float:
    """`/rerank`: one `query` against each of `documents`."""
    payload = unwrap_input(payload)
    return max(pairs_tokens(payload.get("query"), payload.get("documents")), 1.0)


def benchmark_payloads(path: Path, route: str, model: str | None) -> list[JSONObject]:
    """The shipped (query, documents) items, in the shape `route` takes."""
    payloads: list[JSONObject] = []
    for line in path.read_bytes().splitlines():
        if not line.strip():
            continue
        item = orjson.loads(line)
        if route in RERANK_ROUTES:
            payload: JSONObject = {"query": item["query"], "documents": item["documents"]}
        else:
            payload = {"text_1": item["query"], "text_2": item["documents"]}
        payloads.append(payload | ({"model": model} if model else {}))
    return payloads


def build_worker(environ: Mapping[str, str] | None = None) -> WorkerConfig:
    env = os.environ if environ is None else environ
    model_server = engine_model_server(ServerKind.VLLM, env)
    benchmark_route = env.get("BENCHMARK_ROUTE", "").strip() or DEFAULT_BENCHMARK_ROUTE
    served = (*SCORE_ROUTES, *RERANK_ROUTES)
    if benchmark_route not in served:
        choices = ", ".join(served)
        raise ValueError(f"BENCHMARK_ROUTE={benchmark_route!r}: expected one of {choices}")
    routes = [
        RouteConfig(
            path=path,
            workload=score_workload if path in SCORE_ROUTES else rerank_workload,
            request_hook=unwrap_input,
            produced_work=produced_tokens,
            max_queue_time=30.0,
        )
        for path in served
    ]
    return WorkerConfig(
        name="vllm-score",
        model_server=model_server,
        routes=routes,
        benchmark=BenchmarkConfig(
            route=benchmark_route,
            dataset=benchmark_payloads(BENCHMARK_FILE, benchmark_route, model_server.model_id),
        ),
    )


worker = build_worker()

if __name__ == "__main__":  # python -m pyworker.workers.vllm_score.worker
    from pyworker.entry import serve

    serve(worker)
