"""What a template author writes: the model server, the routes and the benchmark.

A worker is a `WorkerConfig`, written in Python (`workers/<name>/worker.py` defining `worker`)
or, for a plain HTTP model server, in TOML. Both go through the same validation, so a bad
config fails at start-up with a message naming the field (`routes.0.max_queue_time: ...`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, Literal, NamedTuple, TypeAlias

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

logger = logging.getLogger(__name__)

JSONObject: TypeAlias = dict[str, Any]
WorkloadFunction: TypeAlias = Callable[[JSONObject], float]
RequestHook: TypeAlias = Callable[[JSONObject], JSONObject | Awaitable[JSONObject]]
ResponseHook: TypeAlias = Callable[[int, bytes], bytes | Awaitable[bytes]]
ProducedWork: TypeAlias = Callable[[JSONObject], float | None]


class HandlerResult(NamedTuple):
    """What a route's custom `handler` answers; sent to the client as it is."""

    status: int
    body: bytes
    content_type: str = "application/json"


ModelHandler: TypeAlias = Callable[
    [aiohttp.ClientSession, str, JSONObject], Awaitable[HandlerResult]
]
"""`handler(session, base_url, payload)`: calls the model server its own way."""

MiB = 1024 * 1024


class _Model(BaseModel):
    # The docstring under a field is its description: the configuration reference
    # (docs/configuration.md, `python -m pyworker.commands.reference`) is generated from it.
    model_config = ConfigDict(
        extra="forbid", arbitrary_types_allowed=True, use_attribute_docstrings=True
    )


class PatternConfig(_Model):
    """A log pattern: a substring, or a regex with `regex = true`."""

    text: str = Field(min_length=1)
    """The substring (or regular expression) looked for in each log line."""
    regex: bool = False
    """`true`: `text` is a Python regular expression, searched anywhere in the line."""
    fatal: bool = True
    """For an error pattern: `true` makes the worker ERRORED; `false` only logs the line."""


Pattern: TypeAlias = str | PatternConfig


class ModelServerConfig(_Model):
    """Where the model server is and how to tell it is loaded, alive, or broken."""

    base_url: str = "http://127.0.0.1:8000"
    """Where the model server listens; each route's payload is posted to `base_url + path`."""
    log_file: str | None = None
    """The model server's log, followed for load, error and info lines (rotation survived).
    None: readiness comes from `health_path` alone."""
    health_path: str | None = None
    """A GET path on the model server that answers 200 when it is healthy; polled every
    `health_interval` once loaded. None: no health checks."""
    model_id: str | None = None
    """Names the model in the benchmark cache key, so another model is measured again."""
    ready_on: Literal["log", "health"] | None = None
    """What says the model is loaded: a load line in the log, or the health path alone.
    By default the log when `log_file` and load patterns are set, else the health path."""
    load_patterns: list[Pattern] = Field(default_factory=list)
    """Log lines that say the model is loaded: strings, or `{text, regex}` tables."""
    error_patterns: list[Pattern] = Field(default_factory=list)
    """Log lines that say the model server failed (ERRORED, unless `fatal = false`)."""
    info_patterns: list[Pattern] = Field(default_factory=list)
    """Log lines worth repeating in the worker's own log (download progress, warnings)."""
    connect_timeout: float = Field(default=5.0, gt=0, le=300)
    """Seconds to open a connection to the model server before the request is a 502."""
    health_interval: float = Field(default=2.0, gt=0)
    """Seconds between health checks of a loaded model."""
    health_failures: int = Field(default=3, ge=1)
    """Consecutive failed health checks of a ready worker that make it ERRORED."""
    ready_timeout: float = Field(default=600.0, gt=0)
    """How long a loaded model may take to answer its health check before that is an error."""

    @property
    def readiness_source(self) -> Literal["log", "health"]:
        if self.ready_on is not None:
            return self.ready_on
        return "log" if self.log_file and self.load_patterns else "health"

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("health_path")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError("must be a path starting with /")
        return value


class RouteConfig(_Model):
    """One route of the worker and how requests on it are admitted and accounted."""

    path: str
    """The worker's POST path clients call (required), e.g. `/v1/completions`."""
    upstream_path: str | None = None
    """The model server's path for it. None: the same as `path`."""
    fifo: bool = False
    """One request at a time, in arrival order (the reference's non-parallel routes);
    the same as `max_concurrency = 1`."""
    max_concurrency: int | None = Field(default=None, ge=1)
    """Requests sent to the model server at once on this route; the others wait in a queue.
    None: no limit and no queue (every admitted request is forwarded at once)."""
    max_queue: int = Field(default=10_000, ge=0)
    """Requests that may wait for a slot when `max_concurrency` (or `fifo`) is set; beyond it,
    429 "queue is full". 0: no waiting, 429 when every slot is busy. There is no unlimited
    value (every queue is bounded): a large number such as 1000000 is the same in practice."""
    max_queue_time: float | None = Field(default=None, gt=0)
    """429 when the estimated wait (workload admitted on the route / measured perf) is longer.
    None: no limit on the wait, only `max_queue` applies."""
    workload: float | str | WorkloadFunction = 1.0
    """A request's workload (what perf and load are counted in): a constant, a dotted payload
    field (`"max_tokens"`, `"parameters.max_new_tokens"`), `"cost"` (the auth_data's cost), or
    in Python a function of the payload."""
    default_workload: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    """The workload used when the field is missing, not a number, negative or not finite, or
    when the workload function raises."""
    read_timeout: float | None = Field(default=600.0, gt=0)
    """Seconds the model server may stay silent before 504; a stream that keeps sending never
    trips it. None: no limit."""
    request_hook: RequestHook | None = None
    """Python only: `hook(payload) -> payload` (may be async), run after the signature check;
    a `ValueError` it raises is a 422."""
    response_hook: ResponseHook | None = None
    """Python only: `hook(status, body) -> body` (may be async), applied to non-streamed
    answers before they are relayed."""
    produced_work: ProducedWork | None = None
    """Python only: `produced_work(answer) -> float | None`, how much work an answer says it did
    (e.g. OpenAI `usage.completion_tokens`); the benchmark counts it instead of the workload."""
    handler: ModelHandler | None = None
    """For model servers with no single request/answer endpoint (ComfyUI: submit, then poll):
    called with the worker's pooled session instead of forwarding the payload to `model_path`,
    here and in the benchmark. `read_timeout` bounds the whole call."""

    @field_validator("path", "upstream_path")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError("must be a path starting with /")
        return value

    @field_validator("workload")
    @classmethod
    def _workload(cls, value: float | str | WorkloadFunction) -> float | str | WorkloadFunction:
        if isinstance(value, float) and (not math.isfinite(value) or value < 0):
            raise ValueError("a constant workload must be a finite number >= 0")
        if isinstance(value, str) and not value.strip():
            raise ValueError("must name a payload field, or be 'cost'")
        return value

    @property
    def model_path(self) -> str:
        return self.upstream_path or self.path

    @property
    def concurrency_limit(self) -> int | None:
        return 1 if self.fifo else self.max_concurrency

    def compute_workload(self, payload: JSONObject, cost: float) -> float:
        """The request's workload; falls back to `default_workload` on anything unusable."""
        rule = self.workload
        value: object
        if isinstance(rule, float):
            return rule
        if isinstance(rule, str):
            if rule == "cost":
                return cost
            value = _lookup(payload, rule)
        else:
            try:
                value = rule(payload)
            except Exception:
                logger.warning("workload function of %s raised; using the default", self.path)
                return self.default_workload
        if isinstance(value, bool) or not isinstance(value, int | float):
            return self.default_workload
        number = float(value)
        return number if math.isfinite(number) and number >= 0 else self.default_workload


def _lookup(payload: JSONObject, dotted: str) -> object:
    value: object = payload
    for key in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


class BenchmarkConfig(_Model):
    """How the worker measures its throughput once the model is loaded."""

    route: str | None = None
    """The route whose payloads are benchmarked (one of `routes`). None: the first route."""
    dataset: list[JSONObject] | None = None
    """Payloads to send, used in turn."""
    dataset_file: str | None = None
    """A JSON array or JSON Lines file of payloads (10,000 at most), read when the benchmark
    starts; a relative path is taken from the working folder."""
    generator: Callable[[int], JSONObject] | None = None
    """Python only: `generator(index) -> payload`. With no dataset, file or generator, the
    benchmark sends `{}`."""
    warmup: bool = True
    """Send one request first, not timed, so that the rounds measure a warm model."""
    rounds: int = Field(default=3, ge=1, le=100)
    """Rounds of `concurrency` requests; the perf is the median of the rounds' throughputs."""
    concurrency: int = Field(default=8, ge=1, le=1024)
    """Requests in flight at once in a round (1 on a `fifo` route)."""
    timeout: float = Field(default=300.0, gt=0)
    """Seconds one benchmark request may take; beyond, it counts as failed."""
    connect_wait: float = Field(default=300.0, gt=0)
    """How long to wait out "connection refused" while the model's port opens."""
    cache_file: str | None = None
    """Where the measured perf is cached, keyed by GPUs, model, route, settings and dataset, so
    that a restarted worker skips the benchmark. None: `$PYWORKER_CACHE_DIR/benchmark.json`,
    else `~/.cache/pyworker/benchmark.json`."""
    reference_file: str | None = ".has_benchmark"
    """After a benchmark, this file (relative to the working folder) gets the perf as text: the
    reference worker's marker, kept so its tooling works. None: not written."""


class SessionConfig(_Model):
    """Bounds on sessions (docs/protocol.md), so that no client can exhaust the worker."""

    max_sessions: int = Field(default=1000, ge=0)
    """Open sessions at most; `/session/create` answers 429 beyond. 0 disables sessions."""
    max_lifetime: float = Field(default=86_400.0, gt=0, allow_inf_nan=False)
    """The longest `lifetime` a session may ask for, and the furthest its expiry may reach."""
    sweep_interval: float = Field(default=1.0, gt=0, le=60)
    """Seconds between sweeps that close expired sessions."""
    close_timeout: float = Field(default=10.0, gt=0, le=300)
    """How long the `on_close_route` call to the model server may take."""
    max_body_size: int = Field(default=64 * 1024, ge=1024, le=MiB)
    """Bytes a session route's request body may hold (413 beyond); the top-level
    `max_body_size` is for the worker's own routes."""
    remember_closed: int = Field(default=10_000, ge=0, le=1_000_000)
    """How many closed session ids are kept to answer 410 "already closed"."""


class WorkerConfig(_Model):
    """A whole worker: what `pyworker run` starts."""

    name: str = "worker"
    """The worker's name, in logs and `/status`."""
    model_server: ModelServerConfig = Field(default_factory=ModelServerConfig)
    """The `[model_server]` table."""
    routes: list[RouteConfig] = Field(min_length=1)
    """The `[[routes]]` tables, one per route (at least one)."""
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig)
    """The `[benchmark]` table."""
    max_body_size: int = Field(default=32 * MiB, ge=1024)
    """Bytes a request body to any route may hold (413 beyond), a top-level key: write it
    before the first table in TOML, or `--set max_body_size=...`."""
    sessions: SessionConfig = Field(default_factory=SessionConfig)
    """The `[sessions]` table."""
    perf: float | None = Field(default=None, gt=0)
    """A known throughput: the benchmark is skipped."""
    gpu_ram: float | None = Field(default=None, gt=0)
    """GB of free VRAM the model needs at start; less is reported as an error."""

    @model_validator(mode="after")
    def _unique_paths(self) -> WorkerConfig:
        seen: set[str] = set()
        for route in self.routes:
            if route.path in seen:
                raise ValueError(f"route path {route.path} appears twice")
            seen.add(route.path)
        if self.benchmark.route is not None and self.benchmark.route not in seen:
            raise ValueError(f"benchmark.route {self.benchmark.route} is not one of the routes")
        return self
