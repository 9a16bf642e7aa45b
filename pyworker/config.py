"""What a template author writes: the model server, the routes and the benchmark.

A worker is a `WorkerConfig`, written in Python (`workers/<name>/worker.py` defining `worker`)
or, for a plain HTTP model server, in TOML. Both go through the same validation, so a bad
config fails at start-up with a message naming the field (`routes.0.max_queue_time: ...`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

logger = logging.getLogger(__name__)

JSONObject: TypeAlias = dict[str, Any]
WorkloadFunction: TypeAlias = Callable[[JSONObject], float]
RequestHook: TypeAlias = Callable[[JSONObject], JSONObject | Awaitable[JSONObject]]
ResponseHook: TypeAlias = Callable[[int, bytes], bytes | Awaitable[bytes]]
ProducedWork: TypeAlias = Callable[[JSONObject], float | None]

MiB = 1024 * 1024


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


class ModelServerConfig(_Model):
    """Where the model server is and how to tell it is alive."""

    base_url: str = "http://127.0.0.1:8000"
    log_file: str | None = None
    health_path: str | None = None
    connect_timeout: float = Field(default=5.0, gt=0, le=300)

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
    read_timeout: float | None = Field(default=600.0, gt=0)
    request_hook: RequestHook | None = None
    response_hook: ResponseHook | None = None
    produced_work: ProducedWork | None = None

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
    dataset: list[JSONObject] | None = None
    dataset_file: str | None = None
    generator: Callable[[int], JSONObject] | None = None
    warmup: bool = True
    rounds: int = Field(default=3, ge=1, le=100)
    concurrency: int = Field(default=8, ge=1, le=1024)
    timeout: float = Field(default=300.0, gt=0)


class WorkerConfig(_Model):
    """A whole worker: what `pyworker run` starts."""

    name: str = "worker"
    model_server: ModelServerConfig = Field(default_factory=ModelServerConfig)
    routes: list[RouteConfig] = Field(min_length=1)
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig)
    max_body_size: int = Field(default=32 * MiB, ge=1024)
    perf: float | None = Field(default=None, gt=0)

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
