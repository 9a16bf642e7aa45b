"""Load-test a `comfyui` endpoint the way clients use it: route each workflow, then send it.

    python -m workers.comfyui.load --autoscaler http://127.0.0.1:8081 --requests 40 \
        --concurrency 4
    python -m workers.comfyui.load --worker http://127.0.0.1:3000 --requests 10  # UNSECURED

Run from the repository root. Workflows cycle through the worker's shipped dataset
(benchmark.json, a JSON list of `{"workflow": ...}` payloads) unless `--dataset` names another,
each sent with a fresh seed so that ComfyUI cannot answer it from its cache. The work counted
is the images each answer holds. Each worker runs one workflow at a time: more concurrency
than workers only queues. It is `pyworker load` with this worker's route and flags.
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from pyworker.devtools.commands.load import add_worker_arguments, run_worker_load
from pyworker.workers.comfyui.client import estimated_cost

DATASET = Path(__file__).resolve().parent / "benchmark.json"
ROUTE = "/workflow"


def reseeded(payload: dict[str, Any]) -> dict[str, Any]:
    """The payload with a fresh random seed in every sampler of its workflow."""
    workflow = copy.deepcopy(payload.get("workflow") or {})
    for node in workflow.values():
        inputs = node.get("inputs", {}) if isinstance(node, dict) else {}
        for key in ("seed", "noise_seed"):
            if isinstance(inputs.get(key), int):
                inputs[key] = random.randrange(2**32)
    return payload | {"workflow": workflow}


def workflow_cost(payload: dict[str, Any]) -> float:
    return estimated_cost(payload.get("workflow") or {})


def images(body: bytes, content_type: str, cost: float) -> float:
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return 0.0
    found = answer.get("images") if isinstance(answer, dict) else None
    return float(len(found)) if isinstance(found, list) else 0.0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Load-test a comfyui worker endpoint.")
    add_worker_arguments(parser, endpoint="comfyui", dataset=DATASET, requests=20, concurrency=1)
    arguments = parser.parse_args(argv)
    return run_worker_load(arguments, ROUTE, prepare=reseeded, cost_of=workflow_cost, work=images)


if __name__ == "__main__":
    sys.exit(main())
