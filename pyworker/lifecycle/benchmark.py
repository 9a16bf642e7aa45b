"""Measuring the model's throughput once it is loaded, in workload units per second.

Every request is timed to its last byte (streams included), and the work counted is what the
answer says was produced (through the route's `produced_work` hook) when it says so. The
result is cached under a key of what was measured, so a cold restart on the same GPU and
model skips the benchmark, and a different GPU or model runs it again.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from pyworker import backports
from pyworker.config import BenchmarkConfig, JSONObject, RouteConfig
from pyworker.config.dataset import BenchmarkError
from pyworker.config.encoded_body import EncodedBody
from pyworker.lifecycle.regular_files import (
    OnceWarnings,
    UnusableFile,
    read_regular,
    write_replacing,
)
from pyworker.protocol.workload import WorkloadError
from pyworker.upstream.errors import ConnectFailed, PoolError
from pyworker.upstream.model import ModelClient

logger = logging.getLogger(__name__)

CACHE_VERSION = 1


@dataclass(slots=True)
class RoundResult:
    requests: int
    succeeded: int
    work: float
    seconds: float

    @property
    def perf(self) -> float:
        return self.work / self.seconds if self.seconds > 0 else 0.0


@dataclass(slots=True)
class BenchmarkResult:
    perf: float
    rounds: list[RoundResult] = field(default_factory=list)
    cached: bool = False
    key: str = ""
    gpu: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "perf": self.perf,
            "rounds": [asdict(r) | {"perf": r.perf} for r in self.rounds],
            "cached": self.cached,
            "key": self.key,
            "gpu": self.gpu,
        }


def cache_key(config: BenchmarkConfig, route: RouteConfig, identity: dict[str, Any]) -> str:
    """What the measurement depends on: GPUs, model, route and benchmark settings, dataset."""
    settings = config.model_dump(exclude={"generator", "dataset"}, mode="json")
    description = {
        "version": CACHE_VERSION,
        "identity": identity,
        "route": route.path,
        "fifo": route.fifo,
        "benchmark": settings,
        "dataset": hashlib.sha256(orjson.dumps(config.dataset or [])).hexdigest(),
    }
    return hashlib.sha256(orjson.dumps(description, option=orjson.OPT_SORT_KEYS)).hexdigest()


MAX_CACHE_BYTES = 1024 * 1024
"""The cache document is a few kilobytes; a larger file is not one the worker wrote."""
_file_warnings = OnceWarnings(logger)


def read_cache(path: Path, key: str) -> BenchmarkResult | None:
    """The cached result for `key`; None if there is none, or the file is not one we wrote."""
    try:
        data = read_regular(path, MAX_CACHE_BYTES)
    except UnusableFile as error:
        _file_warnings.warn(path, f"benchmark cache {error}: not used")
        return None
    except OSError as error:
        _file_warnings.warn(path, f"benchmark cache {path} not read: {error.strerror}")
        return None
    if data is None:
        return None
    _file_warnings.clear(path)
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(document, dict) or document.get("key") != key:
        return None
    perf = document.get("perf")
    if not isinstance(perf, int | float) or perf <= 0:
        return None
    return BenchmarkResult(float(perf), cached=True, key=key, gpu=document.get("gpu") or {})


def write_cache(path: Path, result: BenchmarkResult, reference_file: Path | None) -> None:
    """Write atomically; a full or read-only disk costs the cache, never the worker."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_replacing(path, orjson.dumps(result.to_dict() | {"measured_at": time.time()}))
    except UnusableFile as error:
        _file_warnings.warn(path, f"benchmark cache {error}: not used")
    except OSError as error:
        logger.warning("benchmark cache %s not written: %s", path, error.strerror)
    write_marker(reference_file, result.perf)


def write_marker(path: Path | None, perf: float) -> None:
    """The reference worker's `.has_benchmark`, holding the perf: its tooling reads it."""
    if path is None:
        return
    try:
        write_replacing(path, str(perf).encode())
    except UnusableFile as error:
        _file_warnings.warn(path, f"reference marker {error}: not used")
    except OSError as error:
        logger.warning("%s not written: %s", path, error.strerror)


def produced_documents(body: bytes, content_type: str) -> Iterator[JSONObject]:
    """The JSON objects in an answer: the body, or each SSE `data:` event or ndjson line."""
    lines: Iterator[bytes]
    if content_type == "text/event-stream":
        lines = (line[5:].strip() for line in body.splitlines() if line.startswith(b"data:"))
    elif content_type in ("application/x-ndjson", "application/jsonl"):
        lines = (line.strip() for line in body.splitlines())
    else:
        lines = iter((body,))
    for line in lines:
        if not line or line == b"[DONE]":
            continue
        try:
            document = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(document, dict):
            yield document


class Benchmark:
    """Runs the warm-up and the rounds against the model server."""

    def __init__(
        self,
        model: ModelClient,
        route: RouteConfig,
        config: BenchmarkConfig,
    ) -> None:
        self.model = model
        self.route = route
        self.config = config
        self.concurrency = 1 if route.fifo else config.concurrency
        self.last_failure = ""
        """What the model server last answered to a failed request: status and excerpt."""

    async def run(self, payloads: list[JSONObject]) -> BenchmarkResult:
        cycle = _cycle(payloads)
        if self.config.warmup:
            await self._wait_for_first_answer(next(cycle))
        rounds: list[RoundResult] = []
        for number in range(1, self.config.rounds + 1):
            batch = [next(cycle) for _ in range(self.concurrency)]
            result = await self._round(batch)
            rounds.append(result)
            logger.info(
                "benchmark round %d/%d: %d/%d ok, %.1f work in %.2f s = %.2f/s",
                number,
                self.config.rounds,
                result.succeeded,
                result.requests,
                result.work,
                result.seconds,
                result.perf,
            )
        good = [r.perf for r in rounds if r.succeeded]
        if not good:
            message = f"every benchmark request to {self.route.model_path} failed"
            if self.last_failure:
                message += f" (last answer: {self.last_failure})"
            if self.config.failure_hint:
                message += f"; {self.config.failure_hint}"
            raise BenchmarkError(message)
        return BenchmarkResult(statistics.median(good), rounds)

    async def _wait_for_first_answer(self, payload: JSONObject) -> None:
        """The warm-up; it also waits out "connection refused" while the model's port opens."""
        deadline = time.monotonic() + self.config.connect_wait
        while True:
            try:
                await self._one(payload)
                return
            except (aiohttp.ClientError, PoolError, OSError) as error:
                # Refused while its port opens, or dropped while it warms up: try again.
                if time.monotonic() > deadline:
                    refused = isinstance(error, aiohttp.ClientConnectorError | ConnectFailed)
                    what = "refused connections" if refused else "dropped the warm-up connection"
                    raise BenchmarkError(
                        f"model server {what} for {self.config.connect_wait:.0f} s"
                        f" (last: {error.__class__.__name__})"
                    ) from None
                await asyncio.sleep(0.2)

    async def _round(self, batch: list[JSONObject]) -> RoundResult:
        started = time.monotonic()
        outcomes = await asyncio.gather(*(self._one(p) for p in batch), return_exceptions=True)
        seconds = time.monotonic() - started
        work = 0.0
        succeeded = 0
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                if isinstance(outcome, asyncio.CancelledError):
                    raise outcome
                logger.warning("benchmark request failed: %s", outcome.__class__.__name__)
                continue
            if outcome is not None:
                succeeded += 1
                work += outcome
        return RoundResult(len(batch), succeeded, work, seconds)

    async def _one(self, payload: JSONObject) -> float | None:
        """Work done by one request, timed to its last byte; None if it failed."""
        status, answer, content_type = await self._call(payload)
        if status >= 400:
            logger.warning("benchmark request answered HTTP %d", status)
            self.last_failure = f"HTTP {status} {_excerpt(answer)}".rstrip()
            return None
        try:
            requested = self.route.compute_workload(payload, cost=self.route.default_workload)
        except WorkloadError as error:
            logger.warning("benchmark payload has no usable workload: %s", error.fields())
            return None
        hook = self.route.produced_work
        if hook is None:
            return requested
        produced: float | None = None
        for document in produced_documents(answer, content_type):
            value = hook(document)
            if value is not None:
                produced = value
        return requested if produced is None else float(produced)

    async def _call(self, payload: JSONObject) -> tuple[int, bytes, str]:
        function = self.route.function
        if function is not None:  # a model in the worker's own process
            result = await self.model.collect_function(function, payload, self.config.timeout)
            return result.status, result.body, result.content_type.split(";")[0].strip()
        handler = self.route.handler
        if handler is not None:
            result = await self.model.call_handler(handler, payload, self.config.timeout)
            return result.status, result.body, result.content_type.split(";")[0].strip()
        body: bytes | EncodedBody
        if self.route.body_encoder is not None:
            encoded = self.route.body_encoder(payload)
            body = await encoded if inspect.isawaitable(encoded) else encoded
        else:
            body = orjson.dumps(payload)
        async with (
            backports.timeout(self.config.timeout),
            self.model.post(self.route.model_path, body) as answer,
        ):
            return answer.status, await answer.read(), answer.content_type


FAILURE_EXCERPT = 200
"""Characters of a failed answer quoted in the benchmark's error: enough to name the cause."""


def _excerpt(answer: bytes) -> str:
    text = answer[: FAILURE_EXCERPT * 4].decode("utf-8", "replace")
    text = " ".join(text.split())
    return text[:FAILURE_EXCERPT] + ("..." if len(text) > FAILURE_EXCERPT else "")


def _cycle(payloads: list[JSONObject]) -> Iterator[JSONObject]:
    while True:
        yield from payloads
