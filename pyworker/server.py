"""Running a worker process: the event loop, the listening socket, and stopping on a signal."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Any

from aiohttp import web

from pyworker.app import Worker
from pyworker.config import WorkerConfig
from pyworker.environment import Environment

logger = logging.getLogger(__name__)

# Handlers are cancelled when their client hangs up, so the upstream call stops at once.
RUNNER_OPTIONS: dict[str, Any] = {"handler_cancellation": True, "access_log": None}


def install_fast_loop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux and macOS
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve(worker: Worker, host: str, port: int, stop: asyncio.Event) -> None:
    runner = web.AppRunner(worker.create_app(), **RUNNER_OPTIONS)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=4096, reuse_address=True)
        await site.start()
        bound = _bound_port(runner, port)
        worker.url = worker.environment.public_url(bound)
        print(f"pyworker {worker.config.name} listening on http://{host}:{bound}", flush=True)
        await stop.wait()
        logger.info("stopping")
    finally:
        await runner.cleanup()


def _bound_port(runner: web.AppRunner, fallback: int) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return fallback


def run(config: WorkerConfig, environment: Environment) -> int:
    install_fast_loop()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        worker = Worker(config, environment)
        await serve(worker, environment.host, environment.worker_port, stop)

    try:
        asyncio.run(main())
    except OSError as error:
        print(f"pyworker: cannot serve: {error}", file=sys.stderr)
        return 1
    return 0
