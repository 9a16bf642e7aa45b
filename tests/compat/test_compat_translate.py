"""The reference config API field by field: the same fields and defaults as `vastai` 1.9.1,
each mapped to the pyworker setting with the same meaning, or refused naming it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from pyworker.compat.translate import UNLIMITED_SESSIONS, UnsupportedField, translate
from pyworker.compat.vastai import (
    BenchmarkConfig,
    HandlerConfig,
    JsonDataException,
    LogActionConfig,
    Worker,
    WorkerConfig,
    listen_settings,
)
from pyworker.config import WorkerConfig as NativeConfig
from pyworker.config.environment import Environment
from pyworker.lifecycle.gpu import GpuMonitor
from pyworker.protocol.workload import WorkloadError
from pyworker.serving.compose import compose_worker
from tests.conftest import KeyPair, ModelServer, WorkerFactory, wait_until
from tests.fakes.nvml import FakeNvml

SAMPLE = BenchmarkConfig(dataset=[{"max_tokens": 4}])


def reference(**fields: Any) -> WorkerConfig:
    fields.setdefault("model_server_port", 18000)
    fields.setdefault("handlers", [HandlerConfig(route="/v1/completions", benchmark_config=SAMPLE)])
    return WorkerConfig(**fields)


def envelope(keypair: KeyPair, payload: Any) -> dict[str, Any]:
    return {"auth_data": keypair.auth_data(), "payload": payload}


# --- the same API as the reference --------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["WorkerConfig", "HandlerConfig", "BenchmarkConfig", "LogActionConfig"]
)
def test_fields_order_and_defaults_are_the_reference_ones(name: str) -> None:
    worker_module = pytest.importorskip("vastai.serverless.server.worker")
    ours = {field.name: field for field in dataclasses.fields(globals()[name])}
    theirs = {field.name: field for field in dataclasses.fields(getattr(worker_module, name))}
    assert list(ours) == list(theirs)
    for field_name, field in theirs.items():
        mine = ours[field_name]
        assert mine.default == field.default, field_name
        if field.default_factory is not dataclasses.MISSING:
            assert mine.default_factory is not dataclasses.MISSING, field_name
            made = _plain(mine.default_factory())
            assert made == _plain(field.default_factory()), field_name


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def test_a_worker_passes_its_fields_positionally_as_in_the_reference() -> None:
    handler = HandlerConfig("/generate", None, True, 5.0, SAMPLE)
    config = WorkerConfig("http://127.0.0.1", 18000, "/var/log/model.log", [], [handler])
    native = translate(config)
    assert native.model_server.base_url == "http://127.0.0.1:18000"
    assert native.model_server.log_file == "/var/log/model.log"
    assert native.routes[0].path == "/generate" and native.routes[0].max_queue_time == 5.0


# --- what each field means in pyworker -----------------------------------------------------
def test_model_server_and_log_actions() -> None:
    native = translate(
        reference(
            model_server_url="http://localhost/",
            model_server_port=8080,
            model_log_file="/var/log/portal/vllm.log",
            model_healthcheck_url="http://localhost:8080/health?full=1",
            log_action_config=LogActionConfig(
                on_load=["Application startup complete."],
                on_error=["Traceback (most recent call last):"],
                on_info=['"message":"Download'],
            ),
        )
    )
    server = native.model_server
    assert server.base_url == "http://localhost:8080"
    assert server.health_path == "/health?full=1"
    # Substrings, as the reference's `msg in line`; every error line is fatal there too.
    assert server.load_patterns == ["Application startup complete."]
    assert server.error_patterns == ["Traceback (most recent call last):"]
    assert server.info_patterns == ['"message":"Download']
    assert server.readiness_source == "log"


def test_defaults_of_an_empty_reference_config() -> None:
    native = translate(WorkerConfig(handlers=[HandlerConfig(route="/", benchmark_config=SAMPLE)]))
    assert native.model_server.base_url == "http://127.0.0.1"
    assert native.model_server.health_path is None
    route = native.routes[0]
    assert route.fifo is True  # allow_parallel_requests=False: one request at a time
    assert route.max_queue_time == 30.0
    assert route.compute_workload({"max_tokens": 9}, cost=1.0) == 100.0  # DEFAULT_WORKLOAD
    assert native.sessions.max_sessions == 10


def test_handlers_become_routes() -> None:
    def parse(payload: dict[str, Any]) -> dict[str, Any]:
        return {**payload, "stream": False}

    native = translate(
        reference(
            handlers=[
                HandlerConfig(
                    route="/v1/completions",
                    allow_parallel_requests=True,
                    max_queue_time=None,
                    request_parser=parse,
                    workload_calculator=lambda payload: payload["max_tokens"],
                    benchmark_config=SAMPLE,
                ),
                HandlerConfig(route="/v1/chat/completions", healthcheck="/health"),
            ]
        )
    )
    completions, chat = native.routes
    assert completions.fifo is False and completions.concurrency_limit is None
    assert completions.max_queue_time is None
    assert completions.request_hook is parse
    assert completions.model_path == "/v1/completions"
    assert completions.compute_workload({"max_tokens": 12}, cost=1.0) == 12.0
    # A calculator that fails costs DEFAULT_WORKLOAD (100); one that answers a workload no
    # accounting can hold is refused (422 on the request path).
    assert completions.compute_workload({}, cost=1.0) == 100.0
    with pytest.raises(WorkloadError):
        completions.compute_workload({"max_tokens": -1}, cost=1.0)
    assert completions.compute_workload({"max_tokens": "7"}, cost=1.0) == 7.0
    assert chat.fifo is True
    # HandlerConfig.healthcheck, unread by the reference, is the model server's health path.
    assert native.model_server.health_path == "/health"


def test_benchmark_config() -> None:
    samples = iter(range(1000))
    native = translate(
        reference(
            handlers=[
                HandlerConfig(route="/a"),
                HandlerConfig(
                    route="/b",
                    allow_parallel_requests=True,
                    benchmark_config=BenchmarkConfig(
                        generator=lambda: {"n": next(samples)}, runs=3, concurrency=None
                    ),
                ),
            ]
        )
    )
    benchmark = native.benchmark
    assert benchmark.route == "/b"
    assert benchmark.rounds == 3
    assert benchmark.max_concurrency == 10  # concurrency=None is the reference's 10: the ceiling
    assert benchmark.warmup is True
    assert benchmark.generator is not None
    assert [benchmark.generator(index) for index in range(3)] == [{"n": 0}, {"n": 1}, {"n": 2}]

    dataset = [{"prompt": "a"}, {"prompt": "b"}]
    native = translate(
        reference(
            handlers=[
                HandlerConfig(
                    route="/a",
                    benchmark_config=BenchmarkConfig(dataset=dataset, do_warmup=False),
                )
            ]
        )
    )
    assert native.benchmark.dataset == dataset
    assert native.benchmark.warmup is False
    assert (native.benchmark.rounds, native.benchmark.max_concurrency) == (8, 10)


def test_benchmark_data_and_route_without_a_benchmark_config() -> None:
    native = translate(
        reference(
            handlers=[HandlerConfig(route="/a"), HandlerConfig(route="/b")],
            benchmark_data=[{"x": 1}],
            benchmark_route="/b",
        )
    )
    assert native.benchmark.route == "/b" and native.benchmark.dataset == [{"x": 1}]


@pytest.mark.parametrize(
    ("max_sessions", "expected"), [(None, UNLIMITED_SESSIONS), (0, UNLIMITED_SESSIONS), (3, 3)]
)
def test_max_sessions(max_sessions: int | None, expected: int) -> None:
    assert translate(reference(max_sessions=max_sessions)).sessions.max_sessions == expected


def test_native_config_is_what_worker_serves() -> None:
    config = reference(model_log_file="/var/log/model.log")
    native = Worker(config).native_config()
    assert isinstance(native, NativeConfig)
    assert native.model_dump(mode="json", exclude={"routes"}) == translate(config).model_dump(
        mode="json", exclude={"routes"}
    )


def test_a_lifecycle_loads_the_model_in_process_and_the_log_is_not_followed() -> None:
    """As in the reference: with a lifecycle, entered means loaded; the log is not read."""
    manager = contextlib.nullcontext()
    native = translate(
        reference(
            lifecycle=manager,
            model_log_file="/var/log/model.log",
            log_action_config=LogActionConfig(on_load=["loaded"], on_error=["Traceback"]),
        )
    )
    assert native.lifecycle is manager
    assert native.model_server.log_file is None
    assert native.model_server.load_patterns == native.model_server.error_patterns == []


# --- what pyworker refuses, naming the field ---------------------------------------------
def _handler(**fields: Any) -> list[HandlerConfig]:
    return [HandlerConfig(route="/x", benchmark_config=SAMPLE, **fields)]


async def _remote(**params: Any) -> Any:
    return params


async def _generate(request: web.Request, response: Any) -> web.Response:
    return web.Response()


REFUSALS: dict[str, tuple[dict[str, Any], str]] = {
    "handler_class": ({"handlers": _handler(handler_class=object)}, "handlers[0].handler_class"),
    "payload_class": ({"handlers": _handler(payload_class=dict)}, "handlers[0].payload_class"),
    "remote dispatch without function": (
        {"handlers": _handler(is_remote_dispatch=True)},
        "handlers[0].is_remote_dispatch",
    ),
    "remote function with generator": (
        {"handlers": _handler(remote_function=_remote, response_generator=_generate)},
        "handlers[0].response_generator",
    ),
    "no benchmark": ({"handlers": [HandlerConfig(route="/x")]}, "HandlerConfig.benchmark_config"),
    "no handlers": ({"handlers": []}, "HandlerConfig.benchmark_config"),
    "two benchmarks": (
        {
            "handlers": [
                HandlerConfig(route="/a", benchmark_config=SAMPLE),
                HandlerConfig(route="/b", benchmark_config=SAMPLE),
            ]
        },
        "handlers[1].benchmark_config",
    ),
    "benchmark route elsewhere": ({"benchmark_route": "/other"}, "WorkerConfig.benchmark_route"),
    "dataset and generator": (
        {
            "handlers": [
                HandlerConfig(
                    route="/x",
                    benchmark_config=BenchmarkConfig(dataset=[{}], generator=dict),
                )
            ]
        },
        "handlers[0].benchmark_config.generator",
    ),
    "nothing to send": (
        {"handlers": [HandlerConfig(route="/x", benchmark_config=BenchmarkConfig())]},
        "handlers[0].benchmark_config",
    ),
    "zero runs": (
        {"handlers": [HandlerConfig(route="/x", benchmark_config=BenchmarkConfig([{}], runs=0))]},
        "handlers[0].benchmark_config.runs",
    ),
    "empty log line": (
        {"log_action_config": LogActionConfig(on_error=["OOM", ""])},
        "LogActionConfig.on_error[1]",
    ),
    "one log string": (
        {"log_action_config": LogActionConfig(on_load="ready")},  # type: ignore[arg-type]
        "LogActionConfig.on_load",
    ),
    "negative sessions": ({"max_sessions": -1}, "WorkerConfig.max_sessions"),
    "url without scheme": ({"model_server_url": "127.0.0.1"}, "WorkerConfig.model_server_url"),
    "health elsewhere": (
        {"model_healthcheck_url": "http://10.0.0.9:8000/health"},
        "WorkerConfig.model_healthcheck_url",
    ),
    "zero queue time": ({"handlers": _handler(max_queue_time=0)}, "handlers[0].max_queue_time"),
    "route without slash": (
        {"handlers": [HandlerConfig(route="generate", benchmark_config=SAMPLE)]},
        "handlers[0].route",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refused_fields_are_named(case: str) -> None:
    fields, named = REFUSALS[case]
    with pytest.raises(UnsupportedField) as raised:
        translate(reference(**fields))
    assert raised.value.field == named
    assert str(raised.value).startswith(f"{named}: ")


# --- Worker.run's keyword arguments ---------------------------------------------------------
PLATFORM = {"CONTAINER_ID": "3", "REPORT_ADDR": "http://127.0.0.1:1"}


def test_run_host_and_port() -> None:
    settings, notes = listen_settings({"host": "0.0.0.0", "port": 3000}, PLATFORM)
    assert settings == {"WORKER_HOST": "0.0.0.0", "WORKER_PORT": "3000"}
    assert notes == []
    # The platform's variables win over the code.
    environ = {**PLATFORM, "WORKER_PORT": "5000", "WORKER_HOST": "10.0.0.2"}
    assert listen_settings({"host": "0.0.0.0", "port": 3000}, environ) == ({}, [])
    assert listen_settings({"reuse_address": True}, PLATFORM) == ({}, [])


def test_run_host_off_the_platform_stays_on_loopback() -> None:
    settings, notes = listen_settings({"host": "0.0.0.0"}, {})
    assert settings == {}
    assert len(notes) == 1 and "loopback" in notes[0]


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [({"backlog": 128}, "Worker.run(backlog=...)"), ({"port": "x"}, "Worker.run(port=...)")],
)
def test_run_refuses_what_it_cannot_honour(kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(UnsupportedField) as raised:
        listen_settings(kwargs, PLATFORM)
    assert raised.value.field == named


# --- request parser, response generator, remote function on the request path -----------
def _routes(*handlers: HandlerConfig) -> list[dict[str, Any]]:
    native = translate(reference(handlers=list(handlers)))
    return [route.model_dump(exclude_unset=True) for route in native.routes]


async def test_request_parser_rejection_is_a_422(
    start_worker: WorkerFactory, keypair: KeyPair, model_server: ModelServer
) -> None:
    def parse(payload: dict[str, Any]) -> dict[str, Any]:
        if "prompt" not in payload:
            raise JsonDataException({"prompt": "missing parameter"})
        return {"prompt": payload["prompt"].strip()}

    worker = await start_worker(
        routes=_routes(HandlerConfig(route="/echo", request_parser=parse, benchmark_config=SAMPLE))
    )
    async with worker.post("/echo", envelope(keypair, {"max_tokens": 3})) as response:
        assert response.status == 422
        assert "missing parameter" in (await response.json())["error"]
    async with worker.post("/echo", envelope(keypair, {"prompt": "  hi "})) as response:
        assert response.status == 200
        assert await response.json() == {"received": {"prompt": "hi"}}
    assert model_server.recorder.payloads == [{"prompt": "hi"}]


async def test_response_generator_shapes_the_answer(
    start_worker: WorkerFactory, keypair: KeyPair
) -> None:
    async def shape(request: web.Request, response: Any) -> web.Response:
        answer = await response.json()
        return web.json_response({"echoed": answer["received"]}, status=201)

    async def stream(request: web.Request, response: Any) -> web.StreamResponse:
        return await _prepared(request)  # streams out of sight: not found at start

    worker = await start_worker(
        routes=_routes(
            HandlerConfig(route="/echo", response_generator=shape, benchmark_config=SAMPLE),
            HandlerConfig(route="/stream", response_generator=stream),
        )
    )
    async with worker.post("/echo", envelope(keypair, {"a": 1})) as response:
        assert response.status == 201
        assert await response.json() == {"echoed": {"a": 1}}
    # A generator that streams on the client's connection cannot run here: a clear 500.
    async with worker.post("/stream", envelope(keypair, {"a": 1})) as response:
        assert response.status == 500


async def _prepared(request: web.Request) -> web.StreamResponse:
    streamed = web.StreamResponse()
    await streamed.prepare(request)
    return streamed


async def _streams_itself(request: web.Request, response: Any) -> web.StreamResponse:
    streamed = web.StreamResponse()
    await streamed.prepare(request)
    async for chunk in response.content.iter_any():
        await streamed.write(chunk)
    return streamed


async def _yields_chunks(request: web.Request, response: Any) -> Any:
    async for chunk in response.content.iter_any():
        yield chunk


def _streams_in_a_closure() -> Any:
    async def inner(request: web.Request, response: Any) -> web.StreamResponse:
        async def start() -> web.StreamResponse:
            streamed = web.StreamResponse()
            await streamed.prepare(request)
            return streamed

        return await start()

    return inner


class _Streamer:
    async def __call__(self, request: web.Request, response: Any) -> web.StreamResponse:
        return await _streams_itself(request, response)

    async def method(self, request: web.Request, response: Any) -> web.StreamResponse:
        streamed = web.StreamResponse()
        await streamed.prepare(request)
        return streamed


@pytest.mark.parametrize(
    "generator",
    [
        _streams_itself,
        _yields_chunks,
        _streams_in_a_closure(),
        functools.partial(_streams_itself),
        _Streamer().method,
    ],
    ids=["prepare", "async generator", "closure", "partial", "method"],
)
def test_a_streaming_response_generator_is_refused_saying_what_to_do(generator: Any) -> None:
    with pytest.raises(UnsupportedField) as raised:
        translate(reference(handlers=_handler(response_generator=generator)))
    assert raised.value.field == "handlers[0].response_generator"
    assert "remove the response_generator from this handler" in str(raised.value)
    assert "relays the model server's stream" in str(raised.value)


def test_a_generator_returning_a_response_is_kept() -> None:
    async def shape(request: web.Request, response: Any) -> web.Response:
        return web.json_response(await response.json())

    for generator in (shape, _generate, functools.partial(shape)):
        native = translate(reference(handlers=_handler(response_generator=generator)))
        assert native.routes[0].handler is not None


async def test_remote_function_answers_its_result(
    start_worker: WorkerFactory, keypair: KeyPair, model_server: ModelServer
) -> None:
    async def add(a: int, b: int) -> int:
        return a + b

    worker = await start_worker(
        routes=_routes(HandlerConfig(route="/add", remote_function=add, benchmark_config=SAMPLE))
    )
    async with worker.post("/add", envelope(keypair, {"a": 2, "b": 3})) as response:
        assert response.status == 200
        assert await response.json() == {"result": 5}
    async with worker.post("/add", envelope(keypair, {"a": 2})) as response:
        assert response.status == 500
    assert model_server.recorder.payloads == []


async def test_a_sync_remote_function_runs_in_the_pool_and_a_value_error_is_a_500(
    start_worker: WorkerFactory, keypair: KeyPair
) -> None:
    def divide(a: int, b: int) -> float:
        if b == 0:
            raise ValueError("b is 0")
        return a / b

    worker = await start_worker(
        routes=_routes(HandlerConfig(route="/div", remote_function=divide, benchmark_config=SAMPLE))
    )
    async with worker.post("/div", envelope(keypair, {"a": 3, "b": 2})) as response:
        assert (response.status, await response.json()) == (200, {"result": 1.5})
    async with worker.post("/div", envelope(keypair, {"a": 3, "b": 0})) as response:
        assert response.status == 500  # the reference answers any failure with a 500


# --- log actions in a running worker ----------------------------------------------------------
async def test_on_info_lines_appear_in_the_worker_log(
    tmp_path: Path, model_server: ModelServer, caplog: pytest.LogCaptureFixture
) -> None:
    log = tmp_path / "model.log"
    log.write_text("starting\n")
    config = reference(
        model_server_url=model_server.url,
        model_server_port=None,
        model_log_file=str(log),
        log_action_config=LogActionConfig(on_load=["loaded"], on_info=['"message":"Download']),
    )
    worker = compose_worker(translate(config), Environment.from_env({}), GpuMonitor(FakeNvml([])))
    caplog.set_level(logging.INFO, logger="pyworker.lifecycle.readiness")
    running = asyncio.create_task(worker.readiness.run())
    try:
        with log.open("a") as model_log:
            model_log.write('{"message":"Downloading weights","progress":40}\n')
            model_log.write("an unrelated line\n")

        def info_logged() -> bool:
            return any("Downloading weights" in record.message for record in caplog.records)

        await wait_until(info_logged)
        assert not any("unrelated" in record.message for record in caplog.records)
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        await worker.model.close()
