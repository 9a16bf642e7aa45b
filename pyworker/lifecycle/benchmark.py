"""Measuring the model's throughput once it is loaded, in workload units per second.

Every request is timed to its last byte (streams included), and the work counted is what the
answer says was produced (through the route's `produced_work` hook) when it says so. The
result is cached under a key of what was measured, so a cold restart on the same GPU and
model skips the benchmark, and a different GPU or model runs it again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from pyworker import backports
from pyworker.config import BenchmarkConfig, JSONObject, RouteConfig
from pyworker.config.dataset import BenchmarkError
from pyworker.config.encoded_body import EncodedBody
from pyworker.config.hooks import call_hook
from pyworker.config.worker import MAX_BENCHMARK_CONCURRENCY
from pyworker.lifecycle.closed_loop import Done
from pyworker.lifecycle.ramp import RampOutcome, RampSettings, Step, ramp
from pyworker.lifecycle.regular_files import (
    OnceWarnings,
    UnusableFile,
    read_regular,
    write_replacing,
)
from pyworker.protocol.usage import completion_tokens
from pyworker.protocol.workload import WorkloadError
from pyworker.upstream.errors import ConnectFailed, UpstreamError
from pyworker.upstream.model import ModelClient

logger = logging.getLogger(__name__)

CACHE_VERSION = 3
"""2: the closed-loop ramp (a figure of the rounds of version 1 is measured again); 3: the
chosen N measured again, and the engine's declared limit kept with the figure."""
DEFAULT_CEILING = 256
"""The ramp's ceiling when neither the engine nor the config says: vLLM's default batch."""


@dataclass(slots=True)
class BenchmarkResult:
    perf: float
    curve: list[Step] = field(default_factory=list)
    concurrency: int = 0
    """The number in flight that gave `perf`."""
    confirmed: Step | None = None
    """`concurrency` measured again after the ramp: `perf` is its figure (None: no time)."""
    declared: int | None = None
    """What the engine declared it runs at once when this was measured (None: it did not)."""
    stopped: str = ""
    """Why the ramp ended."""
    ceiling: str = ""
    """The most in flight the ramp could try, and where that came from."""
    counted: str = ""
    """Which work was counted: what the answers said they produced, or what was requested."""
    seconds: float = 0.0
    cached: bool = False
    key: str = ""
    gpu: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "perf": self.perf,
            "concurrency": self.concurrency,
            "confirmed": self.confirmed.to_dict() if self.confirmed is not None else None,
            "declared": self.declared,
            "stopped": self.stopped,
            "ceiling": self.ceiling,
            "counted": self.counted,
            "seconds": self.seconds,
            "curve": [step.to_dict() for step in self.curve],
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
    declared = document.get("declared")
    if declared is not None and (isinstance(declared, bool) or not isinstance(declared, int)):
        return None
    gpu = document.get("gpu") or {}
    return BenchmarkResult(float(perf), cached=True, key=key, gpu=gpu, declared=declared)


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
    """Finds the route's capacity: the warm-up, the ceiling, then the closed-loop ramp."""

    def __init__(
        self,
        model: ModelClient,
        route: RouteConfig,
        config: BenchmarkConfig,
        declared: int | None = None,
    ) -> None:
        self.model = model
        self.route = route
        self.config = config
        self.last_failure = ""
        """What the model server last answered to a failed request: status and excerpt."""
        self.requested = 0.0
        self.produced = 0.0
        self.answers = 0
        self.answers_with_produced = 0
        self.declared = declared
        """What the engine says it runs at once, where it says (`probe_declared`): a step of
        the ramp."""

    async def run(self, payloads: list[JSONObject]) -> BenchmarkResult:
        started = time.monotonic()
        cycle = _cycle(payloads)
        if self.config.warmup:
            await self._wait_for_first_answer(next(cycle))
        ceiling, source = await self.ceiling()
        deadline = time.monotonic() + self.config.max_seconds
        settings = RampSettings(
            ceiling,
            deadline,
            self.config.latency_limit,
            self.declared,
            self.config.token_latency_limit,
        )
        outcome = await ramp(self._one, cycle, settings)
        chosen = outcome.chosen
        if chosen is None or not any(step.requests > step.failed for step in outcome.steps):
            raise BenchmarkError(self._failure_message(outcome))
        if outcome.perf <= 0:
            raise BenchmarkError(self._no_work_message())
        result = BenchmarkResult(
            outcome.perf,
            outcome.steps,
            chosen.concurrency,
            outcome.confirmed,
            self.declared,
            outcome.stopped,
            f"{ceiling} ({source})",
            self._counted(),
            time.monotonic() - started,
        )
        self._warn_unchecked_token_limit(outcome)
        log_result(result)
        return result

    async def ceiling(self) -> tuple[int, str]:
        """The most requests in flight the ramp may try, and where that number came from."""
        if self.route.fifo:
            return 1, "fifo route"
        configured = self.config.max_concurrency or self.config.concurrency
        probe = self.config.limit_probe
        declared = self.declared
        if declared is not None:
            # Twice what the engine runs at once: its own queue then refills a slot the moment
            # a sequence ends, as a worker's share of real traffic does, where N = slots leaves
            # each slot idle for a request's round trip (measured: up to 10 % on llama-server).
            doubled = min(2 * declared, MAX_BENCHMARK_CONCURRENCY)
            if configured is not None and configured < doubled:
                return configured, f"configured; the engine declares {declared}"
            where = probe.path if probe else ""
            return doubled, f"twice the {declared} declared by the engine at {where}"
        if configured is not None:
            return configured, "configured"
        return DEFAULT_CEILING, "default"

    def _warn_unchecked_token_limit(self, outcome: RampOutcome) -> None:
        if self.config.token_latency_limit is None:
            return
        if all(step.p90_per_token is None for step in outcome.steps):
            logger.warning(
                "benchmark: token_latency_limit not applied: no answer of %s said how many"
                " tokens it generated (usage.completion_tokens)",
                self.route.model_path,
            )

    def _failure_message(self, outcome: RampOutcome) -> str:
        if not outcome.steps:
            return (
                f"no benchmark figure within max_seconds {self.config.max_seconds:g}"
                " (the model answered too slowly for one measurement window)"
            )
        if all(step.failed == step.requests for step in outcome.steps):
            message = f"every benchmark request to {self.route.model_path} failed"
        else:
            message = f"benchmark requests to {self.route.model_path} failed: {outcome.stopped}"
        if self.last_failure:
            message += f" (last answer: {self.last_failure})"
        if self.config.failure_hint:
            message += f"; {self.config.failure_hint}"
        return message

    def _no_work_message(self) -> str:
        """Why a benchmark whose answers succeeded measured no work at all."""
        if self.answers_with_produced and self.produced <= 0:
            return (
                f"the answers of {self.route.model_path} report no produced work (the route's"
                " produced_work hook found 0 in every answer): max_perf 0 is no capacity"
            )
        return (
            f"the benchmark payloads of {self.route.model_path} weigh 0 workload units"
            " (their workload field or the route's constant is 0): max_perf 0 is no capacity;"
            " give payloads whose workload is above 0"
        )

    def _counted(self) -> str:
        if self.route.produced_work is None:
            return "requested workload (the route has no produced_work hook)"
        if self.answers_with_produced == self.answers:
            return "produced work (from every answer)"
        if self.answers_with_produced == 0:
            return "requested workload (no answer said what it produced)"
        return (
            f"produced work where the answer said ({self.answers_with_produced} of"
            f" {self.answers}), requested workload otherwise"
        )

    async def _wait_for_first_answer(self, payload: JSONObject) -> None:
        """The warm-up; it also waits out "connection refused" while the model's port opens."""
        deadline = time.monotonic() + self.config.connect_wait
        while True:
            try:
                await self._one(payload)
                return
            except (UpstreamError, OSError) as error:
                # Refused while its port opens, or dropped while it warms up: try again.
                if time.monotonic() > deadline:
                    refused = isinstance(error, ConnectFailed)
                    what = "refused connections" if refused else "dropped the warm-up connection"
                    raise BenchmarkError(
                        f"model server {what} for {self.config.connect_wait:.0f} s"
                        f" (last: {error.__class__.__name__})"
                    ) from None
                await asyncio.sleep(0.2)

    async def _one(self, payload: JSONObject) -> Done | None:
        """Work done by one request, timed to its last byte; None if it failed."""
        status, answer, content_type = await self._call(payload)
        if status >= 400:
            self.last_failure = f"HTTP {status} {_excerpt(answer)}".rstrip()
            return None
        try:
            requested = self.route.compute_workload(payload, cost=self.route.default_workload)
        except WorkloadError as error:
            self.last_failure = f"payload has no usable workload: {error.fields()}"
            return None
        self.answers += 1
        self.requested += requested
        hook = self.route.produced_work
        produced: float | None = None
        tokens: float | None = None
        for document in produced_documents(answer, content_type):
            value = hook(document) if hook is not None else None
            produced = value if value is not None else produced
            tokens = completion_tokens(document) or tokens
        if produced is None:
            return Done(requested, tokens)
        self.answers_with_produced += 1
        self.produced += produced
        return Done(float(produced), tokens)

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
            body = await call_hook(self.route.body_encoder, payload)
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


def log_result(result: BenchmarkResult) -> None:
    """The ramp's outcome in two lines at INFO; the steps were logged as they came."""
    logger.info(
        "benchmark: %.2f/s at %d in flight (%s); the ramp stopped: %s",
        result.perf,
        result.concurrency,
        result.counted,
        result.stopped,
    )
    if result.stopped == "time budget spent":
        logger.warning(
            "benchmark: its time budget (benchmark.max_seconds) ran out: the best figure so"
            " far is reported, and the engine may serve more"
        )
    logger.info("benchmark: ceiling %s, %.1f s in all", result.ceiling, result.seconds)
