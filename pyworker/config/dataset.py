"""The benchmark's payloads: read and checked when the config loads, sent once the model is.

Here, below the benchmark, so that loading a config can refuse a bad dataset file at start
(exit 2, naming the file and line) without importing the lifecycle layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from pyworker.config.worker import BenchmarkConfig, JSONObject

MAX_DATASET = 10_000
GENERATED = 64
"""Payloads a generator makes at least: the ramp cycles through them."""


class BenchmarkError(RuntimeError):
    """The benchmark could not measure anything usable; the message says why."""


def load_dataset(config: BenchmarkConfig) -> list[JSONObject]:
    """The payloads to send, from the inline dataset, a JSON or JSONL file, or the generator."""
    if config.dataset:
        return config.dataset[:MAX_DATASET]
    if config.dataset_file:
        return _read_dataset(Path(config.dataset_file))
    if config.generator is not None:
        count = max(GENERATED, config.rounds * (config.concurrency or 1) + 1)
        return [config.generator(index) for index in range(min(count, MAX_DATASET))]
    return [{}]


def _read_dataset(path: Path) -> list[JSONObject]:
    try:
        text = path.read_bytes()
    except OSError as error:
        raise BenchmarkError(f"benchmark dataset {path}: {error.strerror}") from None
    try:
        document = orjson.loads(text)
        items = document if isinstance(document, list) else [document]
    except orjson.JSONDecodeError:
        items = _json_lines(path, text)
    payloads = [item for item in items if isinstance(item, dict)]
    if not payloads:
        raise BenchmarkError(f"benchmark dataset {path} holds no JSON objects")
    return payloads[:MAX_DATASET]


def _json_lines(path: Path, text: bytes) -> list[Any]:
    """A JSONL file's documents; BenchmarkError naming the first line that is not JSON."""
    items: list[Any] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(orjson.loads(line))
        except orjson.JSONDecodeError as error:
            raise BenchmarkError(
                f"benchmark dataset {path}, line {number}: not JSON ({error}); "
                "a dataset is one JSON list, or one JSON object per line"
            ) from None
    return items
