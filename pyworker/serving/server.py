"""Running a worker process: the event loop, the listening sockets, and stopping on a signal.

SIGTERM, SIGINT or SIGHUP drains the worker (pyworker.serving.drain) and exits 0; a second SIGTERM
or SIGINT during the drain exits at once with 128 + the signal number (143 for SIGTERM, 130 for
SIGINT). What each signal does: pyworker.serving.signals.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import ssl
import sys
from typing import Any

from aiohttp import web

from pyworker.config import WorkerConfig
from pyworker.config.environment import Environment
from pyworker.serving.bind import bind_notes, bind_warnings, running_in_container
from pyworker.serving.compose import Worker, compose_worker
from pyworker.serving.connections import (
    CappedAppRunner,
    DescriptorBudget,
    open_descriptors,
    raise_descriptor_limit,
)
from pyworker.serving.drain import drain
from pyworker.serving.http_errors import JsonErrorRunner
from pyworker.serving.limits import HTTP_LIMITS, body_deadline
from pyworker.serving.memory import pin_mmap_threshold
from pyworker.serving.signals import StopSignals
from pyworker.serving.tls import TLSError, server_ssl_context
from pyworker.startup.failure import fail

logger = logging.getLogger(__name__)

GC_THRESHOLDS = (10_000, 50, 100)
"""Young collections every 10,000 allocations instead of 700: under load the default ran
thousands of collections a second and full ones paused the loop for 30-50 ms (bench/)."""


def tune_garbage_collector() -> None:
    """Move everything alive after start-up out of the collector's sight, and collect less often.

    Start-up objects (modules, config, routes) live as long as the process: scanning them
    on every full collection is pure cost. Cycles are still collected, just in larger batches.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


FUNCTION_SWITCH_INTERVAL = 0.001
"""With route functions in threads, the loop waits at most 1 ms (not Python's 5) for the GIL a
pure-Python function holds: beside four spinning threads, /health's p50 went from 49 ms to 14
(`python -m bench.functions`); code that releases the GIL (numpy, torch) is not affected."""


def tune_thread_switching(config: WorkerConfig) -> None:
    """Hand the GIL over sooner when routes may run Python functions in threads."""
    if any(route.function is not None for route in config.routes):
        sys.setswitchinterval(min(sys.getswitchinterval(), FUNCTION_SWITCH_INTERVAL))


# Handlers are cancelled when their client hangs up, so the upstream call stops at once.
RUNNER_OPTIONS: dict[str, Any] = {"handler_cancellation": True, "access_log": None, **HTTP_LIMITS}
SHUTDOWN_TIMEOUT = 5.0
"""After the drain: how long a handler still running may take before it is cancelled."""


def install_fast_loop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux and macOS
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve(
    worker: Worker,
    host: str,
    port: int,
    stop: asyncio.Event,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    environment = worker.environment
    keepalive = environment.keepalive_timeout
    budget = DescriptorBudget.plan(
        raise_descriptor_limit(), open_descriptors(), environment.max_connections
    )
    logger.info(
        "file descriptors: limit %d; client connections capped at %d (backlog %d)",
        budget.limit,
        budget.max_connections,
        budget.backlog,
    )
    pin_mmap_threshold()
    runner = CappedAppRunner(
        worker.create_app(),
        max_connections=budget.max_connections,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
        keepalive_timeout=keepalive,
        **RUNNER_OPTIONS,
    )
    await runner.setup()
    tune_garbage_collector()
    tune_thread_switching(worker.config)
    side_app = worker.create_side_app()
    side_app.middlewares.append(body_deadline(environment.body_timeout))
    side = JsonErrorRunner(side_app, access_log=None, keepalive_timeout=keepalive, **HTTP_LIMITS)
    await side.setup()
    try:
        site = web.TCPSite(
            runner,
            host,
            port,
            backlog=budget.backlog,
            reuse_address=True,
            ssl_context=ssl_context,
        )
        await site.start()
        bound = _bound_port(runner, port)
        worker.public_url.value = environment.public_url(bound)
        announce_address(environment, worker.url)
        scheme = "https" if ssl_context is not None else "http"
        announce(f"pyworker {worker.config.name} listening on {scheme}://{host}:{bound}")
        await _start_side_port(side, worker)
        await stop.wait()
        logger.info("stopping")
        await drain(worker.drainable, environment.grace_period)
    finally:
        await side.cleanup()
        await runner.cleanup()


async def _start_side_port(side: web.AppRunner, worker: Worker) -> None:
    """The plain-HTTP `/session/end` listener; a worker still serves if its port is taken."""
    host, port = worker.environment.worker_http_host, worker.environment.worker_http_port
    try:
        await web.TCPSite(side, host, port, reuse_address=True).start()
    except OSError as error:
        logger.error(
            "session side port %s:%d not served: %s%s",
            host,
            port,
            error.strerror,
            " (choose another with WORKER_HTTP_PORT)" if error.errno == errno.EADDRINUSE else "",
        )
        return
    announce(f"pyworker /session/end also on http://{host}:{_bound_port(side, port)}")


def announce_address(environment: Environment, url: str) -> None:
    """Say which address signatures must name: a wrong public address shows here first."""
    if environment.unsecured:
        return
    if environment.verify_url:
        logger.info(
            "auth_data must be signed for %s (scheme, host and port;"
            " PYWORKER_VERIFY_URL=false accepts any address)",
            url,
        )
    else:
        logger.warning(
            "PYWORKER_VERIFY_URL=false: auth_data signed for any worker's address is accepted"
        )


def announce(line: str) -> None:
    """Print a line that other programs parse (the bound address) in one write.

    print() writes the text and the newline separately: with unbuffered output a log line
    from another thread could land between them and corrupt the address.
    """
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _bound_port(runner: web.AppRunner, fallback: int) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return fallback


def run(config: WorkerConfig, environment: Environment) -> int:
    ssl_context = None
    if environment.use_ssl:
        try:
            ssl_context = server_ssl_context(environment.tls_cert_file, environment.tls_key_file)
        except TLSError as error:
            fail(str(error))
            return 2
    install_fast_loop()
    in_container = running_in_container()
    for note in bind_notes(environment, in_container):
        logger.info(note)
    for warning in bind_warnings(environment, in_container):
        logger.warning(warning)

    async def main() -> None:
        stop = asyncio.Event()
        StopSignals(stop).install(asyncio.get_running_loop())
        worker = compose_worker(config, environment)
        await serve(worker, environment.host, environment.worker_port, stop, ssl_context)

    try:
        asyncio.run(main())
    except OSError as error:
        fail(f"cannot serve: {error}{_port_hint(error, environment.worker_port)}")
        return 1
    return 0


def _port_hint(error: OSError, port: int) -> str:
    if error.errno != errno.EADDRINUSE:
        return ""
    return (
        f" (another program listens on port {port}: stop it, or choose another port with "
        "--port or WORKER_PORT)"
    )
