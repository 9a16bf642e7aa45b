"""The benchmark against the fake model server, and its cache."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestServer

from pyworker.config import BenchmarkConfig, RouteConfig
from pyworker.config.dataset import BenchmarkError, load_dataset
from pyworker.lifecycle.benchmark import (
    Benchmark,
    BenchmarkResult,
    cache_key,
    produced_documents,
    read_cache,
    write_cache,
)
from pyworker.upstream.model import ModelClient
from tests.conftest import ModelServer
from tests.support.model_server import Recorder, create_app

pytestmark = pytest.mark.exclusive  # throughput against latency, each as measured


def usage_tokens(document: dict[str, Any]) -> float | None:
    usage = document.get("usage")
    return usage.get("completion_tokens") if isinstance(usage, dict) else None


def _route(**fields: Any) -> RouteConfig:
    return RouteConfig.model_validate(
        {"path": "/v1/completions", "workload": "max_tokens", **fields}
    )


async def _run(url: str, route: RouteConfig, **config: Any) -> BenchmarkResult:
    model = ModelClient(url, connect_timeout=1)
    try:
        settings = BenchmarkConfig.model_validate(config)
        return await Benchmark(model, route, settings).run(load_dataset(settings))
    finally:
        await model.close()


async def test_counts_produced_work_from_usage(model_server: ModelServer) -> None:
    # 10 tokens produced of the 100 asked, in 0.05 s, 2 at a time: 400 tokens a second.
    dataset = [{"max_tokens": 100, "produce": 10, "seconds": 0.05}]
    route = _route(produced_work=usage_tokens)
    result = await _run(model_server.url, route, dataset=dataset, max_concurrency=2)
    assert [step.concurrency for step in result.curve] == [1, 2]
    # The 10 produced, not the 100 asked, a request; its time as measured (a loaded machine
    # stretches the 50 ms).
    chosen = next(step for step in result.curve if step.concurrency == result.concurrency)
    assert result.perf == pytest.approx(chosen.concurrency * 10 / chosen.p50, rel=0.2)
    assert result.counted == "produced work (from every answer)"
    assert result.ceiling == "2 (configured)"


async def test_without_a_hook_counts_the_requested_workload(model_server: ModelServer) -> None:
    dataset = [{"max_tokens": 7, "seconds": 0.05}]
    result = await _run(model_server.url, _route(), dataset=dataset, concurrency=1)
    (step,) = result.curve
    assert result.perf == pytest.approx(7 / step.p50, rel=0.2)
    assert result.counted == "requested workload (the route has no produced_work hook)"
    assert result.ceiling == "1 (configured)"  # the older name of max_concurrency


async def test_streams_are_timed_to_their_last_byte(model_server: ModelServer) -> None:
    dataset = [{"max_tokens": 5, "produce": 5, "stream": True, "interval": 0.04}]
    route = _route(produced_work=usage_tokens)
    result = await _run(model_server.url, route, dataset=dataset, max_concurrency=1)
    (step,) = result.curve
    assert step.p50 >= 0.2  # five events 40 ms apart: timed to the last, not the headers
    assert result.perf == pytest.approx(5 / step.p50, rel=0.2)


async def test_fifo_routes_run_one_request_at_a_time(model_server: ModelServer) -> None:
    dataset = [{"max_tokens": 1, "seconds": 0.02}]
    result = await _run(model_server.url, _route(fifo=True), dataset=dataset, max_concurrency=8)
    assert [step.concurrency for step in result.curve] == [1]
    assert result.ceiling == "1 (fifo route)" and result.concurrency == 1


async def test_waits_out_connection_refused_while_the_port_opens() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    recorder = Recorder()
    server = TestServer(create_app(recorder), host="127.0.0.1", port=port)

    async def open_later() -> None:
        await asyncio.sleep(0.5)  # the model server is still loading; it is not a sync point
        await server.start_server()

    opener = asyncio.create_task(open_later())
    try:
        result = await _run(
            f"http://127.0.0.1:{port}", _route(), dataset=[{"max_tokens": 1}], rounds=1
        )
    finally:
        await opener
        await server.close()
    assert result.perf > 0 and len(recorder.payloads) > 1


async def test_gives_up_when_the_port_never_opens(refused_port: int) -> None:
    url = f"http://127.0.0.1:{refused_port}"
    with pytest.raises(BenchmarkError, match="refused connections"):
        await _run(url, _route(), dataset=[{}], connect_wait=0.5)


async def test_every_request_failing_is_an_error(model_server: ModelServer) -> None:
    route = RouteConfig(path="/echo")
    with pytest.raises(BenchmarkError, match="every benchmark request"):
        await _run(model_server.url, route, dataset=[{"status": 500}], rounds=1, warmup=False)


def test_dataset_from_json_and_jsonl_files(tmp_path: Path) -> None:
    as_json = tmp_path / "d.json"
    as_json.write_bytes(orjson.dumps([{"a": 1}, {"a": 2}, "skipped"]))
    as_jsonl = tmp_path / "d.jsonl"
    as_jsonl.write_text('{"a": 1}\n\n{"a": 3}\n')
    assert load_dataset(BenchmarkConfig(dataset_file=str(as_json))) == [{"a": 1}, {"a": 2}]
    assert load_dataset(BenchmarkConfig(dataset_file=str(as_jsonl))) == [{"a": 1}, {"a": 3}]
    generated = load_dataset(BenchmarkConfig(generator=lambda i: {"i": i}, rounds=1, concurrency=2))
    assert generated == [{"i": i} for i in range(64)]  # enough to cycle through at any N
    with pytest.raises(BenchmarkError, match=r"missing\.json"):
        load_dataset(BenchmarkConfig(dataset_file=str(tmp_path / "missing.json")))


def test_produced_documents_of_each_answer_shape() -> None:
    sse = b'data: {"a": 1}\n\n: comment\n\ndata: [DONE]\n\n'
    assert list(produced_documents(sse, "text/event-stream")) == [{"a": 1}]
    assert list(produced_documents(b'{"b": 2}\n{"b": 3}\n', "application/x-ndjson")) == [
        {"b": 2},
        {"b": 3},
    ]
    assert list(produced_documents(b'{"c": 4}', "application/json")) == [{"c": 4}]
    assert list(produced_documents(b"not json", "application/json")) == []


def test_cache_hits_only_for_the_same_gpu_and_model(tmp_path: Path) -> None:
    config, route = BenchmarkConfig(dataset=[{"x": 1}]), _route()
    key = cache_key(config, route, {"gpus": ["GPU-a"], "model": "llama"})
    assert key == cache_key(config, route, {"gpus": ["GPU-a"], "model": "llama"})
    other_gpu = cache_key(config, route, {"gpus": ["GPU-b"], "model": "llama"})
    other_model = cache_key(config, route, {"gpus": ["GPU-a"], "model": "mistral"})
    other_data = cache_key(BenchmarkConfig(dataset=[{"x": 2}]), route, {"gpus": ["GPU-a"]})
    ramp = BenchmarkConfig(dataset=[{"x": 1}], max_seconds=10, latency_limit=2.0)
    other_ramp = cache_key(ramp, route, {"gpus": ["GPU-a"], "model": "llama"})
    assert len({key, other_gpu, other_model, other_data, other_ramp}) == 5

    path = tmp_path / "cache" / "benchmark.json"
    marker = tmp_path / ".has_benchmark"
    assert read_cache(path, key) is None
    write_cache(path, BenchmarkResult(12.5, key=key), marker)
    cached = read_cache(path, key)
    assert cached is not None and cached.perf == 12.5 and cached.cached
    assert read_cache(path, other_gpu) is None
    assert marker.read_text() == "12.5"
    path.write_text("{broken")
    assert read_cache(path, key) is None


def test_unwritable_cache_path_is_survived(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the cache folder should be: mkdir fails
    write_cache(blocker / "sub" / "b.json", BenchmarkResult(1.0, key="k"), blocker / "x" / "m")
    assert blocker.read_text() == "x"
