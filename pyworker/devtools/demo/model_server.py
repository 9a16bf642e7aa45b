"""A demo model server: a stand-in for an LLM server, not a model.

It speaks the OpenAI completions and chat API like vLLM does, but the "text" is words drawn from
a small list, seeded by the prompt, produced at a fixed rate on the CPU with no weights loaded.
It exists so a worker can be run, benchmarked and tested end to end on any machine.

It mimics what a worker sees of a real server: a load time during which every request gets 503,
start-up log lines followed by one line containing `LOADED_LINE` once it is ready, an access
line per request (never the prompt), `GET /health` and `GET /v1/models`.

    python -m pyworker.devtools.demo.model_server --port 8000 --load-seconds 2 \
        --log-file /tmp/model.log
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from pyworker.backports import StrEnum
from pyworker.devtools.demo.lines import LineWriter
from pyworker.devtools.demo.openai import (
    GenerationRequest,
    Kind,
    RequestError,
    ResponseBuilder,
    error_body,
    parse_chat,
    parse_completion,
)
from pyworker.devtools.demo.text import generate_tokens
from pyworker.devtools.listen import run_server, server_parser

# The server logs a line containing this text once requests are served; a worker config matches
# it as its *loaded* pattern. It is what vLLM (through uvicorn) prints when it is ready.
LOADED_LINE = "Application startup complete."
# Printed (to stdout, and to the log file if any) once the socket is bound.
LISTENING_PATTERN = re.compile(r"listening on (http://\S+)")

MAX_TOKENS_LIMIT = 4096
_YIELD_EVERY = 64  # tokens written back to back before letting other requests run

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class DemoSettings:
    model: str = "demo"
    tokens_per_second: float = 200.0  # per request; 0 means as fast as possible
    load_seconds: float = 2.0
    max_tokens_limit: int = MAX_TOKENS_LIMIT
    max_concurrent_requests: int = 0  # requests generating at once; 0 means no limit
    log_file: Path | None = None  # None: stdout


class LoadState(StrEnum):
    LOADING = "loading"
    LOADED = "loaded"


class DemoModel:
    """The server's state (loading, then loaded) and its paced token generation."""

    def __init__(self, settings: DemoSettings, log: LineWriter) -> None:
        self.settings = settings
        self.log = log
        self.state = LoadState.LOADING
        self.loaded = asyncio.Event()
        limit = settings.max_concurrent_requests
        self._slots = asyncio.Semaphore(limit) if limit > 0 else None

    async def load(self) -> None:
        settings = self.settings
        self.log.write(_vllm_line("Starting vLLM-compatible demo server (a stand-in, no model)"))
        self.log.write(
            _vllm_line(
                f"args: model={settings.model!r} tokens_per_second={settings.tokens_per_second} "
                f"load_seconds={settings.load_seconds} pid={os.getpid()}"
            )
        )
        self.log.write(_vllm_line(f"Loading model {settings.model!r} (simulated)..."))
        await asyncio.sleep(settings.load_seconds)
        self.log.write(_vllm_line(f"Loading weights took {settings.load_seconds:.2f} seconds"))
        self.state = LoadState.LOADED
        self.loaded.set()
        self.log.write(_vllm_line("Model loaded"))
        self.log.write(f"INFO:     Started server process [{os.getpid()}]")
        self.log.write("INFO:     Waiting for application startup.")
        self.log.write(f"INFO:     {LOADED_LINE}")

    async def tokens(self, request: GenerationRequest) -> AsyncGenerator[str, None]:
        """Yield the answer's tokens, token i at (i + 1) / rate seconds after the start."""
        async with self._slot():
            tokens = generate_tokens(request.prompt_key, request.max_tokens)
            rate = self.settings.tokens_per_second
            loop = asyncio.get_running_loop()
            started = loop.time()
            for index, token in enumerate(tokens):
                if rate > 0:
                    delay = started + (index + 1) / rate - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                elif index % _YIELD_EVERY == _YIELD_EVERY - 1:
                    await asyncio.sleep(0)
                yield token

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        if self._slots is None:
            yield
            return
        async with self._slots:
            yield


MODEL_KEY = web.AppKey("demo_model", DemoModel)


def _vllm_line(message: str) -> str:
    return f"INFO {time.strftime('%m-%d %H:%M:%S')} [demo_server.py] {message}"


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _model(request: web.Request) -> DemoModel:
    return request.app[MODEL_KEY]


@web.middleware
async def _access_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One uvicorn-style line per request: address, method, path and status; never the body."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "-"
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as error:
        status = error.status
        raise
    except asyncio.CancelledError:
        status = 499
        raise
    finally:
        line = (
            f"{request.method} {request.path} HTTP/{request.version.major}.{request.version.minor}"
        )
        entry = f'INFO:     {client} - "{line}" {status} {_phrase(status)}'
        _model(request).log.write(entry.rstrip())


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


async def _health(request: web.Request) -> web.Response:
    model = _model(request)
    if model.state is LoadState.LOADING:
        return _json({"status": "loading"}, status=503)
    return _json({"status": "ok"})


async def _models(request: web.Request) -> web.Response:
    model = _model(request)
    if model.state is LoadState.LOADING:
        return _loading()
    entry = {"id": model.settings.model, "object": "model", "created": 0, "owned_by": "pyworker"}
    return _json({"object": "list", "data": [entry]})


def _loading() -> web.Response:
    return _json(error_body("the model is loading", "service_unavailable"), status=503)


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, Kind.COMPLETION)


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, Kind.CHAT)


async def _generate(request: web.Request, kind: Kind) -> web.StreamResponse:
    model = _model(request)
    if model.state is LoadState.LOADING:
        return _loading()
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _json(error_body("the request body is not valid JSON"), status=400)
    parse = parse_chat if kind is Kind.CHAT else parse_completion
    try:
        generation = parse(body, model.settings.max_tokens_limit)
    except RequestError as error:
        return _json(error_body(error.message, param=error.param), status=400)
    builder = ResponseBuilder(generation, model.settings.model)
    if generation.stream:
        return await _stream(request, model, generation, builder)
    async with contextlib.aclosing(model.tokens(generation)) as stream:
        tokens = [token async for token in stream]
    return _json(builder.full(tokens))


async def _stream(
    request: web.Request, model: DemoModel, generation: GenerationRequest, builder: ResponseBuilder
) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    produced = 0
    try:
        if generation.kind is Kind.CHAT:
            await response.write(_event(builder.role_chunk()))
        async with contextlib.aclosing(model.tokens(generation)) as tokens:
            async for token in tokens:  # closed on any exit, so its concurrency slot is freed
                await response.write(_event(builder.token_chunk(token)))
                produced += 1
        await response.write(_event(builder.final_chunk()))
        if generation.include_usage:
            await response.write(_event(builder.usage_chunk(produced)))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client left; nothing to tell it
    return response


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


def create_app(settings: DemoSettings | None = None) -> web.Application:
    """The demo server's application; loading starts when the application starts."""
    settings = settings or DemoSettings()
    app = web.Application(middlewares=[_access_log])
    log = LineWriter(settings.log_file)
    model = DemoModel(settings, log)
    app[MODEL_KEY] = model

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await log.start()
        loading = asyncio.create_task(model.load())
        yield
        loading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loading
        log.write("INFO:     Shutting down")
        await log.close()

    app.cleanup_ctx.append(lifecycle)
    app.add_routes(
        [
            web.get("/health", _health),
            web.get("/v1/models", _models),
            web.post("/v1/completions", _completions),
            web.post("/v1/chat/completions", _chat_completions),
        ]
    )
    return app


def build_parser() -> argparse.ArgumentParser:
    parser = server_parser(
        "python -m pyworker.devtools.demo.model_server",
        "A demo OpenAI-compatible model server: a CPU stand-in, not a model.",
        port=8000,
    )
    parser.add_argument("--model", default="demo", help="model name in answers")
    parser.add_argument(
        "--tokens-per-second", type=float, default=200.0, help="per request; 0: no pacing"
    )
    parser.add_argument("--load-seconds", type=float, default=2.0, help="simulated load time")
    parser.add_argument("--max-tokens-limit", type=int, default=MAX_TOKENS_LIMIT)
    parser.add_argument(
        "--max-concurrent-requests", type=int, default=0, help="0: no limit; others wait"
    )
    parser.add_argument("--log-file", type=Path, help="append the log here instead of stdout")
    return parser


def _settings(arguments: argparse.Namespace) -> DemoSettings:
    return DemoSettings(
        model=arguments.model,
        tokens_per_second=max(arguments.tokens_per_second, 0.0),
        load_seconds=max(arguments.load_seconds, 0.0),
        max_tokens_limit=max(arguments.max_tokens_limit, 1),
        max_concurrent_requests=max(arguments.max_concurrent_requests, 0),
        log_file=arguments.log_file,
    )


async def serve(settings: DemoSettings, host: str, port: int, stop: asyncio.Event) -> None:
    """Serve until `stop` is set; announces the bound address in a `LISTENING_PATTERN` line."""
    app = create_app(settings)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = next(
            (address[1] for address in runner.addresses if isinstance(address, tuple)), port
        )
        shown_host = f"[{host}]" if ":" in host else host
        line = f"INFO:     Demo server listening on http://{shown_host}:{bound} (CTRL+C to quit)"
        app[MODEL_KEY].log.write(line)
        if settings.log_file is not None:
            await asyncio.to_thread(print, line, flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    settings = _settings(arguments)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await serve(settings, arguments.host, arguments.port, stop)

    return run_server(run(), "demo model server")


if __name__ == "__main__":
    raise SystemExit(main())
