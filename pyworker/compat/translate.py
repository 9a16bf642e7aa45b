"""A reference SDK config, translated into pyworker's native `WorkerConfig`.

Every field of `vastai` 1.9.1 either maps to a pyworker setting with the same meaning or is
refused with `UnsupportedField`, which names the field and the pyworker way to do the same
thing: nothing a template author wrote is dropped without a word. docs/migrating.md lists the
mapping field by field.
"""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import urlsplit

from pyworker.compat.handlers import (
    remote_function_route,
    response_generator_handler,
    streams,
)
from pyworker.compat.reference import (
    DEFAULT_WORKLOAD,
    BenchmarkConfig,
    HandlerConfig,
    LogActionConfig,
    WorkerConfig,
    WorkloadCalculator,
)
from pyworker.config import JSONObject, ModelHandler, RouteFunction, WorkloadFunction
from pyworker.config import WorkerConfig as NativeConfig
from pyworker.config.dataset import BenchmarkError
from pyworker.config.loader import ConfigError, validate_config

DEFAULT_HOST_URL = "http://127.0.0.1"
MAX_ROUNDS = 100
MAX_CONCURRENCY = 1024
UNLIMITED_SESSIONS = 1000
"""The reference's "no limit" (`max_sessions=None` or `0`); pyworker bounds every table."""
REFERENCE_RUNS = 8
REFERENCE_CONCURRENCY = 10


class UnsupportedField(ConfigError):
    """A reference field pyworker cannot honour as written; the message says what to do."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field


def translate(config: WorkerConfig) -> NativeConfig:
    """The native config with the same meaning as `config`; `UnsupportedField` if none exists."""
    if not isinstance(config, WorkerConfig):
        raise UnsupportedField(
            "Worker(config)", "expects a WorkerConfig from pyworker.compat.vastai"
        )
    return validate_config(raw_native(config), source="(translated from the reference config)")


def raw_native(config: WorkerConfig) -> dict[str, Any]:
    """The native config as a dict, before pyworker's own validation."""
    handlers = list(config.handlers) or [HandlerConfig(route="/")]
    base_url = _base_url(config.model_server_url, config.model_server_port)
    routes = [_route(index, handler) for index, handler in enumerate(handlers)]
    _check_unique(handlers)
    native: dict[str, Any] = {
        "model_server": {
            "base_url": base_url,
            "health_path": _health_path(config, handlers, base_url),
        },
        "routes": routes,
        "benchmark": _benchmark(config, handlers),
        "sessions": {"max_sessions": _max_sessions(config.max_sessions)},
    }
    if config.lifecycle is not None:
        # Loaded in the worker's process: entered means loaded, and, as in the reference,
        # the model log is not followed (model_log_file and LogActionConfig are not read).
        native["lifecycle"] = config.lifecycle
    else:
        native["model_server"]["log_file"] = config.model_log_file or None
        native["model_server"].update(_log_patterns(config.log_action_config))
    return native


# --- the model server ---------------------------------------------------------------------
def _base_url(url: str | None, port: int | None) -> str:
    base = (url or DEFAULT_HOST_URL).rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise UnsupportedField(
            "WorkerConfig.model_server_url", f"{url!r} is not an http:// or https:// URL"
        )
    if port is None:
        return base
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise UnsupportedField("WorkerConfig.model_server_port", f"{port!r} is not a TCP port")
    return f"{base}:{port}"


def _health_path(config: WorkerConfig, handlers: list[HandlerConfig], base_url: str) -> str | None:
    """The worker-wide health URL, else the one the handlers agree on (the reference
    declares `HandlerConfig.healthcheck` but never reads it; pyworker probes it)."""
    if config.model_healthcheck_url:
        url = config.model_healthcheck_url
        return _as_path("WorkerConfig.model_healthcheck_url", url, base_url)
    declared = {h.healthcheck for h in handlers if h.healthcheck}
    if len(declared) > 1:
        raise UnsupportedField(
            "HandlerConfig.healthcheck",
            f"handlers name different health URLs {sorted(declared)}; pyworker probes one "
            "health URL for the model server: set WorkerConfig.model_healthcheck_url",
        )
    if declared:
        return _as_path("HandlerConfig.healthcheck", declared.pop(), base_url)
    return None


def _as_path(field: str, url: str, base_url: str) -> str:
    """A path on the model server, as the reference's session resolves the URL against it."""
    parts = urlsplit(url)
    if parts.scheme or parts.netloc:
        base = urlsplit(base_url)
        if (parts.scheme, parts.netloc) != (base.scheme, base.netloc):
            raise UnsupportedField(
                field,
                f"{url!r} is not on the model server {base_url}; pyworker probes a path "
                "on the model server: give the path (e.g. '/health')",
            )
    path = parts.path if parts.path.startswith("/") else "/" + parts.path
    return path + (f"?{parts.query}" if parts.query else "")


def _log_patterns(actions: LogActionConfig) -> dict[str, list[str]]:
    patterns: dict[str, list[str]] = {}
    for name, native in (
        ("on_load", "load_patterns"),
        ("on_error", "error_patterns"),
        ("on_info", "info_patterns"),
    ):
        values = getattr(actions, name)
        if isinstance(values, str):
            raise UnsupportedField(
                f"LogActionConfig.{name}", "must be a list of strings, not one string"
            )
        for index, value in enumerate(values):
            if not isinstance(value, str) or not value:
                raise UnsupportedField(
                    f"LogActionConfig.{name}[{index}]",
                    f"{value!r}: each entry must be a non-empty string (an empty one would "
                    "match every line)",
                )
        patterns[native] = list(values)
    return patterns


def _max_sessions(value: int | None) -> int:
    if value is None or value == 0:
        return UNLIMITED_SESSIONS
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UnsupportedField(
            "WorkerConfig.max_sessions",
            f"{value!r}: give a number of sessions, or None for pyworker's bound "
            f"({UNLIMITED_SESSIONS})",
        )
    return value


# --- the routes ---------------------------------------------------------------------------
def _route(index: int, handler: HandlerConfig) -> dict[str, Any]:
    where = f"handlers[{index}]"
    _refuse_classes(where, handler)
    route = handler.route
    if not isinstance(route, str) or not route.startswith("/"):
        raise UnsupportedField(f"{where}.route", f"{route!r} is not a path starting with /")
    max_queue_time = handler.max_queue_time
    if max_queue_time is not None and not (
        isinstance(max_queue_time, int | float) and 0 < max_queue_time < math.inf
    ):
        raise UnsupportedField(
            f"{where}.max_queue_time",
            f"{max_queue_time!r}: give a number of seconds above 0, or None for no limit",
        )
    native: dict[str, Any] = {
        "path": route,
        "fifo": not handler.allow_parallel_requests,
        "max_queue_time": None if max_queue_time is None else float(max_queue_time),
        "workload": _workload(handler.workload_calculator),
        "default_workload": DEFAULT_WORKLOAD,
    }
    if handler.request_parser is not None:
        native["request_hook"] = handler.request_parser
    if handler.remote_function is not None:
        native["function"] = _remote_function(where, handler)
    elif handler.response_generator is not None:
        native["handler"] = _response_generator(where, handler)
    return native


def _refuse_classes(where: str, handler: HandlerConfig) -> None:
    if handler.handler_class is not None:
        raise UnsupportedField(
            f"{where}.handler_class",
            "pyworker has no EndpointHandler classes. Use HandlerConfig's request_parser, "
            "workload_calculator and response_generator, or pyworker's native "
            "RouteConfig(request_hook=, workload=, response_hook=, handler=) "
            "(docs/migrating.md)",
        )
    if handler.payload_class is not None:
        raise UnsupportedField(
            f"{where}.payload_class",
            "pyworker has no ApiPayload classes. Use request_parser (from_json_msg and "
            "generate_payload_json), workload_calculator (count_workload) and "
            "BenchmarkConfig(dataset= or generator=) (for_test), or pyworker's native "
            "RouteConfig(request_hook=, workload=) (docs/migrating.md)",
        )
    if handler.is_remote_dispatch and handler.remote_function is None:
        raise UnsupportedField(
            f"{where}.is_remote_dispatch",
            "is True but no remote_function is given: give the async function to call",
        )


def _workload(calculator: WorkloadCalculator | None) -> float | WorkloadFunction:
    if calculator is None:
        return DEFAULT_WORKLOAD

    def workload(payload: JSONObject) -> float:
        # float() as the reference does, so a calculator returning "12" or Decimal works;
        # anything it raises makes pyworker use default_workload (100), as the reference.
        return float(calculator(payload))

    return workload


def _remote_function(where: str, handler: HandlerConfig) -> RouteFunction:
    if handler.response_generator is not None:
        raise UnsupportedField(
            f"{where}.response_generator",
            "is never called on a handler with a remote_function (its result is "
            'answered as {"result": ...}): remove one of the two',
        )
    if not callable(handler.remote_function):
        raise UnsupportedField(f"{where}.remote_function", "must be a function")
    return remote_function_route(handler.route, handler.remote_function)


def _response_generator(where: str, handler: HandlerConfig) -> ModelHandler:
    generator = handler.response_generator
    assert generator is not None
    if streams(generator):
        raise UnsupportedField(
            f"{where}.response_generator",
            "streams its answer itself (prepare() on the client's connection), which "
            "pyworker does for it: remove the response_generator from this handler and "
            "pyworker relays the model server's stream as it comes, as the reference does "
            "with no generator; keep a generator only to return a web.Response built from "
            "the model's answer (docs/migrating.md)",
        )
    return response_generator_handler(handler.route, generator)


def _check_unique(handlers: list[HandlerConfig]) -> None:
    seen: set[str] = set()
    for index, handler in enumerate(handlers):
        if handler.route in seen:
            raise UnsupportedField(
                f"handlers[{index}].route", f"{handler.route} is given to two handlers"
            )
        seen.add(handler.route)


# --- the benchmark ------------------------------------------------------------------------
def _benchmark(config: WorkerConfig, handlers: list[HandlerConfig]) -> dict[str, Any]:
    routes = [handler.route for handler in handlers]
    if config.benchmark_route is not None and config.benchmark_route not in routes:
        raise UnsupportedField(
            "WorkerConfig.benchmark_route",
            f"{config.benchmark_route!r} is not the route of a handler ({', '.join(routes)})",
        )
    configured = [h for h in handlers if h.benchmark_config is not None]
    if len(configured) > 1:
        raise UnsupportedField(
            f"handlers[{handlers.index(configured[1])}].benchmark_config",
            "a BenchmarkConfig on more than one handler: pyworker, like the reference, "
            "measures one route; keep it on one handler",
        )
    if configured:
        handler = configured[0]
        if config.benchmark_route is not None and config.benchmark_route != handler.route:
            raise UnsupportedField(
                "WorkerConfig.benchmark_route",
                f"{config.benchmark_route!r} but the BenchmarkConfig is on {handler.route!r}",
            )
        assert handler.benchmark_config is not None
        where = f"handlers[{handlers.index(handler)}].benchmark_config"
        return {"route": handler.route, **_benchmark_settings(where, handler.benchmark_config)}
    if config.benchmark_data:
        # Declared but unread in the reference; here it means what it says.
        route = config.benchmark_route or routes[0]
        return {
            "route": route,
            "dataset": _dataset("WorkerConfig.benchmark_data", config.benchmark_data),
            "rounds": REFERENCE_RUNS,
            "max_concurrency": REFERENCE_CONCURRENCY,
        }
    raise UnsupportedField(
        "HandlerConfig.benchmark_config",
        "no handler has one (the reference refuses to start too): give the handler to "
        "measure benchmark_config=BenchmarkConfig(dataset=[...]) or (generator=...)",
    )


def _benchmark_settings(where: str, benchmark: BenchmarkConfig) -> dict[str, Any]:
    settings: dict[str, Any] = {"warmup": bool(benchmark.do_warmup)}
    if benchmark.dataset is not None and benchmark.generator is not None:
        raise UnsupportedField(
            f"{where}.generator",
            "the reference uses the dataset and never calls the generator: give only one",
        )
    if benchmark.dataset is not None:
        settings["dataset"] = _dataset(f"{where}.dataset", benchmark.dataset)
    elif benchmark.generator is not None:
        settings["generator"] = _generator(benchmark.generator)
    else:
        raise UnsupportedField(where, "give dataset=[...] or generator=... to send")
    runs = benchmark.runs
    if isinstance(runs, bool) or not isinstance(runs, int) or not 1 <= runs <= MAX_ROUNDS:
        raise UnsupportedField(f"{where}.runs", f"{runs!r}: give 1 to {MAX_ROUNDS} rounds")
    settings["rounds"] = runs
    concurrency = REFERENCE_CONCURRENCY if not benchmark.concurrency else benchmark.concurrency
    if (
        isinstance(concurrency, bool)
        or not isinstance(concurrency, int)
        or not 1 <= concurrency <= MAX_CONCURRENCY
    ):
        raise UnsupportedField(
            f"{where}.concurrency", f"{concurrency!r}: give 1 to {MAX_CONCURRENCY} requests"
        )
    settings["max_concurrency"] = concurrency  # the ramp's ceiling (docs/benchmark.md)
    return settings


def _dataset(where: str, dataset: object) -> list[JSONObject]:
    if not isinstance(dataset, list) or not dataset:
        raise UnsupportedField(where, "must be a non-empty list of JSON objects")
    for index, item in enumerate(dataset):
        if not isinstance(item, dict):
            raise UnsupportedField(f"{where}[{index}]", f"{type(item).__name__} is not a dict")
    return list(dataset)


def _generator(generator: Any) -> Any:
    """pyworker calls `generator(index)`; the reference calls `generator()`."""

    def generate(index: int) -> JSONObject:
        # A failing generator fails the benchmark (error_msg), as in the reference.
        try:
            sample = generator()
        except Exception as error:
            raise BenchmarkError(f"benchmark generator raised {error!r}") from error
        if not isinstance(sample, dict):
            raise BenchmarkError(f"benchmark generator returned {type(sample).__name__}")
        return dict(sample)

    return generate
