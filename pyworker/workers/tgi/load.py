"""Load-test a `tgi` endpoint the way clients use it: route each request, then send it.

    python -m workers.tgi.load --autoscaler http://127.0.0.1:8081 --requests 200 \
        --concurrency 16 --stream
    python -m workers.tgi.load --worker http://127.0.0.1:3000 --requests 50   # UNSECURED

Run from the repository root. Payloads cycle through the worker's shipped dataset
(benchmark.jsonl) unless `--dataset` names another JSON or JSONL file. The work counted is
each answer's `details.generated_tokens` (a stream's last event), so the workload per second
printed is the tokens TGI really generated; the first byte of a stream is its first token.
It is `pyworker load` with this worker's routes and flags.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pyworker.devtools.commands.load import add_worker_arguments, run_worker_load
from pyworker.lifecycle.benchmark import produced_documents
from pyworker.workers.tgi.client import estimated_cost

DATASET = Path(__file__).resolve().parent / "benchmark.jsonl"


def with_details(payload: dict[str, Any]) -> dict[str, Any]:
    """Ask TGI for the token counts; `decoder_input_details` is refused when streaming."""
    parameters = dict(payload.get("parameters") or {})
    parameters["details"] = True
    parameters.pop("decoder_input_details", None)
    return payload | {"parameters": parameters}


def generated_tokens(body: bytes, content_type: str, cost: float) -> float:
    """`details.generated_tokens` of the answer (its last event for a stream); 0 if absent."""
    tokens = 0.0
    for document in produced_documents(body, content_type):
        details = document.get("details")
        if isinstance(details, dict) and isinstance(details.get("generated_tokens"), int):
            tokens = float(details["generated_tokens"])
    return tokens


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Load-test a tgi worker endpoint.")
    add_worker_arguments(parser, endpoint="tgi", dataset=DATASET)
    parser.add_argument("--stream", action="store_true", help="use /generate_stream")
    arguments = parser.parse_args(argv)
    route = "/generate_stream" if arguments.stream else "/generate"
    return run_worker_load(
        arguments, route, prepare=with_details, cost_of=estimated_cost, work=generated_tokens
    )


if __name__ == "__main__":
    sys.exit(main())
