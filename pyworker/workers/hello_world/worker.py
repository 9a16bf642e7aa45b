"""hello_world: the smallest complete worker, in front of pyworker's demo model server.

The demo server (`python -m pyworker.devtools.demo.model_server`) speaks the OpenAI completions
API like vLLM, without a model, so this worker runs anywhere. It shows each part of a config:

- the model server: where it listens, the log line that says it is loaded, its health path;
- the routes: the workload of a request is its `max_tokens`, and the work a request really
  produced is the `usage.completion_tokens` of its answer;
- the benchmark: payloads from a dataset file shipped beside this one.

`pyworker dev` runs it with the demo server; by hand:

    python -m pyworker.devtools.demo.model_server --port 8000 --log-file /tmp/pyworker-demo.log &
    pyworker run hello_world
"""

from __future__ import annotations

from pathlib import Path

from pyworker.config import (
    BenchmarkConfig,
    ModelServerConfig,
    RouteConfig,
    WorkerConfig,
)
from pyworker.devtools.demo.model_server import LOADED_LINE
from pyworker.devtools.demo.openai import DEFAULT_MAX_TOKENS
from pyworker.protocol.usage import completion_tokens

HERE = Path(__file__).resolve().parent
MODEL_LOG = "/tmp/pyworker-demo.log"
"""Where the demo server logs when started by hand as above (`MODEL_LOG` overrides it)."""


def openai_route(path: str) -> RouteConfig:
    return RouteConfig(
        path=path,
        workload="max_tokens",
        default_workload=DEFAULT_MAX_TOKENS,  # what the server generates when none is asked
        max_queue_time=30.0,
        produced_work=completion_tokens,
    )


worker = WorkerConfig(
    name="hello_world",
    model_server=ModelServerConfig(
        base_url="http://127.0.0.1:8000",
        log_file=MODEL_LOG,
        health_path="/health",
        model_id="pyworker-demo",
        load_patterns=[LOADED_LINE],
    ),
    routes=[openai_route("/v1/completions"), openai_route("/v1/chat/completions")],
    benchmark=BenchmarkConfig(
        route="/v1/completions",
        dataset_file=str(HERE / "benchmark.jsonl"),
    ),
)

if __name__ == "__main__":  # python -m pyworker.workers.hello_world.worker
    from pyworker.entry import serve

    serve(worker)
