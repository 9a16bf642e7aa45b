"""Load-test an `openai` endpoint the way clients use it: route each request, then send it.

    python -m workers.openai.load --autoscaler http://127.0.0.1:8081 --requests 200 \
        --concurrency 16 --stream
    python -m workers.openai.load --worker http://127.0.0.1:3000 --requests 50   # UNSECURED

Run from the repository root. Payloads cycle through the worker's shipped dataset
(benchmark.jsonl) unless `--dataset` names another JSON or JSONL file. The work counted is
each answer's `usage.completion_tokens` (streams ask for it with
`stream_options.include_usage`), so the workload per second printed is the tokens the model
really produced. It is `pyworker load` with this worker's route and flags.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pyworker.devtools.commands.load import add_worker_arguments, run_worker_load

DATASET = Path(__file__).resolve().parent / "benchmark.jsonl"
ROUTE = "/v1/completions"


def cost_of(payload: dict[str, Any]) -> float:
    """The cost announced to the autoscaler: prompt characters / 4 plus max_tokens."""
    return len(str(payload.get("prompt", ""))) / 4 + float(payload.get("max_tokens", 16))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Load-test an openai worker endpoint.")
    add_worker_arguments(parser, endpoint="openai", dataset=DATASET)
    parser.add_argument("--stream", action="store_true", help="stream the answers (SSE)")
    parser.add_argument("--model", default="", help="model name, if the server checks it")
    arguments = parser.parse_args(argv)

    def prepare(payload: dict[str, Any]) -> dict[str, Any]:
        if arguments.model:
            payload = payload | {"model": arguments.model}
        if arguments.stream:
            payload = payload | {"stream": True, "stream_options": {"include_usage": True}}
        return payload

    return run_worker_load(arguments, ROUTE, prepare=prepare, cost_of=cost_of)


if __name__ == "__main__":
    sys.exit(main())
