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

from pyworker.workload import MAX_WORKLOAD, WorkloadError, check_workload

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
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


class PatternConfig(_Model):
    """A log pattern: a substring, or a regex with `regex = true`."""

    text: str = Field(min_length=1)
    regex: bool = False
    fatal: bool = True


Pattern: TypeAlias = str | PatternConfig


class ModelServerConfig(_Model):
    """Where the model server is and how to tell it is loaded, alive, or broken."""

    base_url: str = "http://127.0.0.1:8000"
    log_file: str | None = None
    health_path: str | None = None
    model_id: str | None = None
    """Names the model in the benchmark cache key, so another model is measured again."""
    ready_on: Literal["log", "health"] | None = None
    """What says the model is loaded: a load line in the log, or the health path alone.
    By default the log when `log_file` and load patterns are set, else the health path."""
    load_patterns: list[Pattern] = Field(default_factory=list)
    error_patterns: list[Pattern] = Field(default_factory=list)
    info_patterns: list[Pattern] = Field(default_factory=list)
    connect_timeout: float = Field(default=5.0, gt=0, le=300)
    health_interval: float = Field(default=2.0, gt=0)
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
    upstream_path: str | None = None
    fifo: bool = False
    max_concurrency: int | None = Field(default=None, ge=1)
    max_queue: int = Field(default=10_000, ge=0)
    max_queue_time: float | None = Field(default=None, gt=0)
    workload: float | str | WorkloadFunction = 1.0
    default_workload: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    max_workload: float = Field(default=MAX_WORKLOAD, gt=0, le=MAX_WORKLOAD)
    """The most workload one request may carry on this route: a request whose workload (from
    its payload field, the workload function, or its `cost`) is over it, negative, not finite
    or not a number is refused with 422 naming the field (docs/input.md)."""
    read_timeout: float | None = Field(default=600.0, gt=0)
    request_hook: RequestHook | None = None
    response_hook: ResponseHook | None = None
    produced_work: ProducedWork | None = None
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

    @model_validator(mode="after")
    def _within_cap(self) -> RouteConfig:
        for name in ("workload", "default_workload"):
            value = getattr(self, name)
            if isinstance(value, float) and value > self.max_workload:
                raise ValueError(f"{name} {value:g} is over max_workload {self.max_workload:g}")
        return self

    @property
    def model_path(self) -> str:
        return self.upstream_path or self.path

    @property
    def concurrency_limit(self) -> int | None:
        return 1 if self.fifo else self.max_concurrency

    def compute_workload(self, payload: JSONObject, cost: float) -> float:
        """The request's workload; WorkloadError when the client's numbers make it unusable.

        A payload field that is missing or null, or a workload function that raises or
        returns None, gives `default_workload`. A value that is there but is not a finite
        number from 0 to `max_workload` is refused (booleans are not numbers).
        """
        rule = self.workload
        cap = self.max_workload
        if isinstance(rule, float):
            return rule
        if isinstance(rule, str):
            if rule == "cost":
                return _checked(cost, cap, "auth_data", "cost")
            value = _lookup(payload, rule)
            if value is None:
                return self.default_workload
            return _checked(value, cap, "payload", rule)
        try:
            value = rule(payload)
        except Exception:
            logger.warning("workload function of %s raised; using the default", self.path)
            return self.default_workload
        if value is None:
            return self.default_workload
        return _checked(value, cap, "payload", None)


def _checked(value: object, cap: float, section: str, field: str | None) -> float:
    try:
        return check_workload(value, cap)
    except ValueError as error:
        if field is None:
            raise WorkloadError(f"its workload {error}", section) from None
        raise WorkloadError(str(error), section, field) from None


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
    dataset: list[JSONObject] | None = None
    dataset_file: str | None = None
    generator: Callable[[int], JSONObject] | None = None
    warmup: bool = True
    rounds: int = Field(default=3, ge=1, le=100)
    concurrency: int = Field(default=8, ge=1, le=1024)
    timeout: float = Field(default=300.0, gt=0)
    connect_wait: float = Field(default=300.0, gt=0)
    """How long to wait out "connection refused" while the model's port opens."""
    cache_file: str | None = None
    """Default: $PYWORKER_CACHE_DIR/benchmark.json, else ~/.cache/pyworker/benchmark.json."""
    reference_file: str | None = ".has_benchmark"
    """The reference worker's marker (its perf as text), kept so its tooling works."""


class SessionConfig(_Model):
    """Bounds on sessions (PROTOCOL.md "Session routes"), so no client can exhaust the worker."""

    max_sessions: int = Field(default=1000, ge=0)
    """Open sessions at most; `/session/create` answers 429 beyond. 0 disables sessions."""
    max_lifetime: float = Field(default=86_400.0, gt=0, allow_inf_nan=False)
    """The longest `lifetime` a session may ask for, and the furthest its expiry may reach."""
    sweep_interval: float = Field(default=1.0, gt=0, le=60)
    close_timeout: float = Field(default=10.0, gt=0, le=300)
    """How long the `on_close_route` call to the model server may take."""
    max_body_size: int = Field(default=64 * 1024, ge=1024, le=MiB)
    remember_closed: int = Field(default=10_000, ge=0, le=1_000_000)
    """How many closed session ids are kept to answer 410 "already closed"."""


class WorkerConfig(_Model):
    """A whole worker: what `pyworker run` starts."""

    name: str = "worker"
    model_server: ModelServerConfig = Field(default_factory=ModelServerConfig)
    routes: list[RouteConfig] = Field(min_length=1)
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig)
    max_body_size: int = Field(default=32 * MiB, ge=1024)
    sessions: SessionConfig = Field(default_factory=SessionConfig)
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
