"""The reference SDK's configuration classes (`vastai` 1.9.1, `vastai.serverless.server`).

Same names, same fields in the same order (positional arguments keep working), same defaults.
They only hold what a `worker.py` wrote: `pyworker.compat.translate` turns them into a
`pyworker.config.WorkerConfig`, and refuses what pyworker cannot honour.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from aiohttp import ClientResponse, web

RequestPayloadParser: TypeAlias = Callable[[dict[str, Any]], dict[str, Any]]
ClientResponseGenerator: TypeAlias = Callable[
    [web.Request, ClientResponse], Awaitable[web.Response | web.StreamResponse]
]
WorkloadCalculator: TypeAlias = Callable[[dict[str, Any]], float]

DEFAULT_WORKLOAD = 100.0
"""The reference's workload of a request with no calculator, or whose calculator failed."""


class JsonDataException(ValueError):
    """Raised by a `request_parser` for a bad payload: the client gets 422, as in the reference.

    `message` is what the reference puts in its 422 body, typically `{"field": "what is wrong"}`.
    """

    def __init__(self, json_msg: Any) -> None:
        super().__init__(json_msg)
        self.message = json_msg

    def __str__(self) -> str:
        if isinstance(self.message, str):
            return self.message
        return json.dumps(self.message, default=str)


@dataclass
class LogActionConfig:
    """Lines of the model log: each entry is a substring looked for in every line."""

    on_load: list[str] = field(default_factory=list)
    on_error: list[str] = field(default_factory=list)
    on_info: list[str] = field(default_factory=list)


@dataclass
class BenchmarkConfig:
    """How the throughput is measured: `runs` rounds of `concurrency` requests at once."""

    dataset: list[dict[str, Any]] | None = None
    generator: Callable[[], dict[str, Any]] | None = None
    runs: int = 8
    concurrency: int | None = 10
    do_warmup: bool = True


@dataclass
class HandlerConfig:
    """One route, forwarded to the same path on the model server."""

    route: str
    healthcheck: str | None = None
    allow_parallel_requests: bool = False
    max_queue_time: float | None = 30.0
    benchmark_config: BenchmarkConfig | None = None
    handler_class: type[Any] | None = None
    payload_class: type[Any] | None = None
    request_parser: RequestPayloadParser | None = None
    response_generator: ClientResponseGenerator | None = None
    workload_calculator: WorkloadCalculator | None = None
    is_remote_dispatch: bool = False
    remote_function: Callable[..., Any] | None = None


@dataclass
class WorkerConfig:
    """A whole reference worker; the model server is at `model_server_url:model_server_port`."""

    model_server_url: str | None = None
    model_server_port: int | None = None
    model_log_file: str | None = None
    benchmark_data: list[dict[str, Any]] = field(default_factory=list)
    handlers: list[HandlerConfig] = field(default_factory=list)
    model_healthcheck_url: str | None = None
    benchmark_route: str | None = None
    log_action_config: LogActionConfig = field(default_factory=LogActionConfig)
    max_sessions: int | None = 10
    lifecycle: AbstractAsyncContextManager[Any] | None = None
